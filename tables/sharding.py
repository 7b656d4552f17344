"""Sharding embedding tables with torchrec: sharders, planner constraints, DMP wrapping.

Everything here configures torchrec; none of it shards tables itself. Facts found on
torchrec 1.8 / fbgemm-gpu-cpu 1.8 (and proven in tests/tables/test_sharding.py):

* **Sharders.** torchrec's EBC sharder lists `row_wise` and `table_row_wise` only for CUDA
  although both run on CPU with gloo; `RowWiseOnCpuEmbeddingBagCollectionSharder` adds them
  back. Sequence tables (`EmbeddingCollection`) have no `table_row_wise` in torchrec on any
  device, and on CPU not `data_parallel` either: fbgemm's CPU dense TBE op ignores
  `PoolingMode.NONE` and returns one pooled row per bag, which crashes the lookup;
  `CpuEmbeddingCollectionSharder` drops it there so that the planner never picks it.
* **Sparse optimizer.** Tables get fbgemm's fused optimizer through PyTorch's
  `_apply_optimizer_in_backward` (torchrec's own wrapper is deprecated in its favour, and its
  `in_backward_optimizer_filter` recognises only this one): the TBE kernel updates the touched
  rows inside backward, so a table has neither a separate sparse step nor a dense gradient.
  fbgemm's CPU TBE has no Adam (only exact SGD / Adagrad / row-wise Adagrad), so "adam" is
  CUDA-only. Its CPU row-wise Adagrad also ignores `weight_decay` in every mode (L2 and
  decoupled; see tests/tables/test_sharding.py), so embedding L2 is a loss term instead
  (`models.ranking.RankingModel`). Data-parallel tables get a plain dense kernel instead,
  which the fused optimizer does not cover: `combined_optimizer` steps them with the same
  optimizer, unfused.
  Row-wise Adagrad keeps one accumulator per row *per column shard*, so under column-wise
  sharding it averages squared gradients over the shard's columns, not the whole row.
* **Gradient reduction across ranks.** Every parameter receives the *mean* over ranks of
  the per-rank gradients: DDP averages dense layers and data-parallel tables, and torchrec's
  embedding collectives divide by the world size in backward (`comm_ops.GRADIENT_DIVISION`)
  to match. With equal local batches, a per-rank mean loss trains like the global-batch
  mean loss.
* **Mean pooling under row-wise sharding.** When a mean-pooled table of an EBC is row-wise
  or table-row-wise, torchrec divides the EBC's pooled output by bag lengths after the
  reduce-scatter, with a divisor of 1 only for the sum-pooled features of row-sharded tables:
  the outputs of the same EBC's table-wise / column-wise / data-parallel tables get divided
  by their bag lengths too.
  `check_plan` rejects such plans (device-independent; torchrec code, not fbgemm). Mean-pooled
  tables work under every sharding when all of that EBC's tables are row-sharded, or none of
  its mean-pooled ones is.
* **Initial rows.** A sharded collection calls its tables' `init_fn` on each local shard
  without saying where the shard sits in the table; `shard_model` writes the rows of the
  tables drawn by a `tables.initializers.RowInit` into their local shards by offset, so
  that any sharding starts with exactly the unsharded table's rows.
* **Output order.** A sharded EBC's `KeyedTensor` lists features grouped by sharding, not
  in config order: read pooled embeddings by key (`kt[feature]`, `to_dict()`), never by
  position in `values()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

import psutil
import torch
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.composable.table_batched_embedding_slice import (
    TableBatchedEmbeddingSlice,
)
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.types import (
    KernelConfig,
    ParameterConstraints,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim import RowWiseAdagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from tables.initializers import RowInit

AUTO = "auto"
OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# fbgemm's TBE default; set explicitly so the plain reference optimizer matches it
# (torchrec's RowWiseAdagrad alone defaults to 1e-10).
_ADAGRAD_EPS = 1e-8
_CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
_COLUMN_BLOCK_MULTIPLE = 4  # torchrec only cuts column shards whose width divides by 4
_ROW_SHARDED = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)


class RowWiseOnCpuEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """torchrec's EBC sharder that also offers row-wise and table-row-wise on CPU.

    torchrec lists them only for CUDA, yet its row-wise input/output dists are plain
    all-to-all / reduce-scatter collectives that gloo runs on CPU; only the list changes.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        extra = [ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value]
        return types + [t for t in extra if t not in types]


class CpuEmbeddingCollectionSharder(EmbeddingCollectionSharder):
    """torchrec's EC sharder without data-parallel on CPU, where its lookup is broken.

    Data-parallel sequence tables use fbgemm's dense TBE, whose CPU op returns pooled rows
    despite `PoolingMode.NONE`; the sequence output then cannot be split per feature.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
        return types


def make_sharders() -> list[ModuleSharder[nn.Module]]:
    """The sharders for pooled (EBC) and sequence (EC) tables, fit for CPU and CUDA."""
    return [RowWiseOnCpuEmbeddingBagCollectionSharder(), CpuEmbeddingCollectionSharder()]


def sparse_optimizer_spec(
    optimizer: str, lr: float
) -> tuple[type[torch.optim.Optimizer], dict[str, float]]:
    """The torch optimizer class and kwargs that torchrec maps onto an fbgemm fused optimizer.

    The same pair, applied to an unsharded module, is the plain reference the fused update
    equals (fbgemm EXACT_ROWWISE_ADAGRAD / EXACT_ADAGRAD / ADAM / EXACT_SGD). Only keys
    both sides accept.
    """
    specs: dict[str, tuple[type[torch.optim.Optimizer], dict[str, float]]] = {
        "rowwise_adagrad": (RowWiseAdagrad, {"lr": lr, "eps": _ADAGRAD_EPS}),
        "adagrad": (torch.optim.Adagrad, {"lr": lr, "eps": _ADAGRAD_EPS}),
        "adam": (torch.optim.Adam, {"lr": lr}),
        "sgd": (torch.optim.SGD, {"lr": lr}),
    }
    if optimizer not in specs:
        raise ValueError(f"unknown sparse optimizer {optimizer!r}; expected one of {list(specs)}")
    return specs[optimizer]


def embedding_tables(module: nn.Module) -> dict[str, tuple[type[nn.Module], BaseEmbeddingConfig]]:
    """Every torchrec table inside `module`: name -> (EBC or EC class, table config)."""
    tables: dict[str, tuple[type[nn.Module], BaseEmbeddingConfig]] = {}
    for child in module.modules():
        if isinstance(child, EmbeddingBagCollection):
            configs: list[BaseEmbeddingConfig] = list(child.embedding_bag_configs())
            tables.update({c.name: (EmbeddingBagCollection, c) for c in configs})
        elif isinstance(child, EmbeddingCollection):
            configs = list(child.embedding_configs())
            tables.update({c.name: (EmbeddingCollection, c) for c in configs})
    return tables


def _column_block(embedding_dim: int, world_size: int) -> int:
    """Narrowest column shard torchrec may cut so that a table splits over <= world_size shards.

    torchrec's default minimum shard width is 128 columns, which leaves tables of dim 16-64
    in one piece; it takes the smallest width >= this bound that divides the dim and is a
    multiple of 4 (the whole dim if none is).
    """
    return max(_COLUMN_BLOCK_MULTIPLE, -(-embedding_dim // world_size))


def sharding_constraints(
    module: nn.Module, sharding: Mapping[str, str], world_size: int, compute_device: str
) -> dict[str, ParameterConstraints]:
    """Planner constraints pinning each table's configured sharding type ("auto": none).

    Tables not named in `sharding` are left to the planner. Fails before planning on an
    unknown table, and on a type the table's sharder does not offer on `compute_device`
    (the planner would only report that no plan exists).
    """
    tables = embedding_tables(module)
    offered = {s.module_type: s.sharding_types(compute_device) for s in make_sharders()}
    constraints: dict[str, ParameterConstraints] = {}
    for name, choice in sharding.items():
        if name not in tables:
            raise ValueError(f"sharding names table {name!r}, which is not in the model")
        if choice == AUTO:
            continue
        module_type, config = tables[name]
        if choice not in offered[module_type]:
            raise ValueError(
                f"table {name!r} ({module_type.__name__}): sharding {choice!r} is not "
                f"available on {compute_device}; choose one of {[AUTO, *offered[module_type]]}"
            )
        min_partition = None
        if choice == ShardingType.COLUMN_WISE.value:
            min_partition = _column_block(config.embedding_dim, world_size)
        constraints[name] = ParameterConstraints(
            sharding_types=[choice], min_partition=min_partition
        )
    return constraints


def apply_sparse_optimizer(
    module: nn.Module, optimizer: str, lr: float, device: torch.device
) -> None:
    """Attach the fused in-backward optimizer to every torchrec table parameter in `module`.

    Must run before DMP: the sharders read the attached optimizer to build fused TBE kernels.
    """
    if device.type == "cpu" and optimizer not in _CPU_FUSED_OPTIMIZERS:
        raise ValueError(
            f"sparse optimizer {optimizer!r} has no fused fbgemm kernel on CPU; "
            f"use one of {list(_CPU_FUSED_OPTIMIZERS)}"
        )
    optimizer_class, kwargs = sparse_optimizer_spec(optimizer, lr)
    for child in module.modules():
        if isinstance(child, EmbeddingBagCollection | EmbeddingCollection):
            _apply_optimizer_in_backward(optimizer_class, child.parameters(), kwargs)


def plan_sharding(
    module: nn.Module,
    sharding: Mapping[str, str],
    pg: ProcessGroup,
    device: torch.device,
    sharders: list[ModuleSharder[nn.Module]],
) -> ShardingPlan:
    """Plan on rank 0 and broadcast, so that every rank shards identically.

    The topology's local world size is torchrec's own (LOCAL_WORLD_SIZE), the value its
    table-row-wise sharding uses to form the intra-node groups the plan must match; on CPU
    its host memory (DDR) is the real one, shared by the host's ranks, not torchrec's
    default of 128 GiB per rank.
    """
    world_size = pg.size()
    local = get_local_size(world_size)
    # On CPU the ranks of a host share its memory: each may plan for its part of it.
    host = psutil.virtual_memory().total // local if device.type == "cpu" else None
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size, local_world_size=local, ddr_cap_bytes=host
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    constraints = sharding_constraints(module, sharding, world_size, device.type)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    return planner.collective_plan(module, sharders, pg)


def check_plan(module: nn.Module, plan: ShardingPlan) -> None:
    """Reject plans that torchrec shards into wrong numbers (see the module docstring).

    A mean-pooled row-sharded table turns on torchrec's mean-pooling division for its whole
    EBC, which also divides the outputs of that EBC's tables sharded any other way.
    """
    for path, child in module.named_modules():
        if not isinstance(child, EmbeddingBagCollection) or path not in plan.plan:
            continue
        types = {t: s.sharding_type for t, s in plan.plan[path].items()}  # type: ignore[union-attr]
        mean_row_sharded = [
            c.name
            for c in child.embedding_bag_configs()
            if c.pooling == PoolingType.MEAN and types[c.name] in _ROW_SHARDED
        ]
        others = sorted(t for t, kind in types.items() if kind not in _ROW_SHARDED)
        if mean_row_sharded and others:
            raise ValueError(
                f"{path or 'model'}: mean-pooled tables {mean_row_sharded} are row-sharded while "
                f"tables {others} are not; torchrec would divide the latter's pooled output by "
                "bag lengths. Shard them all row-wise / table-row-wise, or the mean-pooled ones "
                "another way"
            )


def shard_model(
    module: nn.Module,
    sharding: dict[str, str],
    optimizer: str,
    lr: float,
    pg: ProcessGroup,
    device: torch.device,
) -> DistributedModelParallel:
    """Shard the torchrec tables of `module` over `pg`; everything else becomes DDP.

    `sharding` maps table names to a config sharding choice; `optimizer`/`lr` configure the
    fused sparse optimizer. Non-table submodules are kept as they are and replicated.
    """
    apply_sparse_optimizer(module, optimizer, lr, device)
    sharders = make_sharders()
    plan = plan_sharding(module, sharding, pg, device, sharders)
    check_plan(module, plan)
    inits = table_inits(module)
    dmp = DistributedModelParallel(
        module,
        env=ShardingEnv.from_process_group(pg),
        device=device,
        plan=plan,
        sharders=sharders,
    )
    write_initial_rows(dmp.module, inits)
    return dmp


def table_inits(module: nn.Module) -> dict[str, dict[str, tuple[RowInit, int]]]:
    """Per torchrec collection in `module` (by path), its tables whose config's `init_fn`
    is a `RowInit`: (that init, the table's width)."""
    found = {}
    for path, child in module.named_modules():
        if isinstance(child, EmbeddingBagCollection):
            configs: list[BaseEmbeddingConfig] = list(child.embedding_bag_configs())
        elif isinstance(child, EmbeddingCollection):
            configs = list(child.embedding_configs())
        else:
            continue
        inits = {
            c.name: (c.init_fn, c.embedding_dim) for c in configs if isinstance(c.init_fn, RowInit)
        }
        if inits:
            found[path] = inits
    return found


@torch.no_grad()
def write_initial_rows(
    module: nn.Module, inits: Mapping[str, Mapping[str, tuple[RowInit, int]]]
) -> None:
    """Draw the rows of every table of `inits` into its local shards (or replica) in the
    sharded `module` (a DMP's `.module`), as the unsharded table would hold them.

    torchrec's sharded collections call `init_fn` on each local shard without its offsets
    (every shard would start as the table's first rows); their state dict holds views of
    the kernels' weights, with the offsets.
    """
    for path, tables in inits.items():
        state = module.get_submodule(path).state_dict()
        for table, (init, width) in tables.items():
            key = f"embedding_bags.{table}.weight"  # an `EmbeddingCollection`: `embeddings`
            weight = state[key if key in state else f"embeddings.{table}.weight"]
            if not hasattr(weight, "local_shards"):  # data-parallel: a whole replica
                init.fill(weight, width=width)
                continue
            for shard in weight.local_shards():
                first_row, first_col = shard.metadata.shard_offsets
                init.fill(shard.tensor, first_row, first_col, width)


def _is_table(param: nn.Parameter) -> bool:
    """Whether a DMP parameter is a table weight (torchrec exposes them as TBE slices)."""
    return isinstance(param, TableBatchedEmbeddingSlice)


def dense_parameters(model: DistributedModelParallel) -> dict[str, nn.Parameter]:
    """Dense-layer parameters: DDP-averaged gradients, updated by the dense optimizer."""
    unfused = in_backward_optimizer_filter(model.named_parameters())
    return {name: p for name, p in unfused if not _is_table(p)}


def replicated_table_parameters(model: DistributedModelParallel) -> dict[str, nn.Parameter]:
    """Data-parallel table weights, which the fused optimizer does not update.

    torchrec gives replicated tables a plain dense kernel whose gradient DDP averages over
    ranks; they still need a regular step, with the configured sparse optimizer.
    """
    unfused = in_backward_optimizer_filter(model.named_parameters())
    return {name: p for name, p in unfused if _is_table(p)}


def combined_optimizer(
    model: DistributedModelParallel,
    optimizer: str,
    lr: float,
    dense_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
    own: Mapping[str, tuple[Callable[[str], bool], OptimizerFactory]] | None = None,
) -> KeyedOptimizer:
    """One optimizer for the training loop, covering every parameter exactly once.

    Parts: the fused table optimizer (its `step()` is a no-op, rows were updated in
    backward; it is included so that `state_dict()` carries its state), the sparse optimizer
    run as a plain torch optimizer on data-parallel tables, and `dense_optimizer` on the rest.
    `own` maps a name to (parameter-name predicate, optimizer factory): the dense
    parameters it selects get that optimizer instead (e.g. OptEmbed's thresholds, SGD).
    """
    optims: list[tuple[str, KeyedOptimizer]] = [("sparse", model.fused_optimizer)]
    replicated = replicated_table_parameters(model)
    if replicated:
        optimizer_class, kwargs = sparse_optimizer_spec(optimizer, lr)
        factory = partial(optimizer_class, **kwargs)
        optims.append(("replicated", KeyedOptimizerWrapper(replicated, factory)))
    dense = dense_parameters(model)
    for name, (selects, factory) in (own or {}).items():
        mine = {k: p for k, p in dense.items() if selects(k)}
        dense = {k: p for k, p in dense.items() if k not in mine}
        if mine:
            optims.append((name, KeyedOptimizerWrapper(mine, factory)))
    if dense:
        optims.append(("dense", KeyedOptimizerWrapper(dense, dense_optimizer)))
    return CombinedOptimizer(optims)
