"""Training throughput of DLRM on one multiplexed table against per-feature hashed tables.

Both models come from experiment configs through the engine's own path (`build_model`:
ID transforms -> `PooledEmbeddings` -> DLRM), sharded by `shard_model` on a one-rank gloo
group (every table table-wise, fbgemm's fused row-wise Adagrad, Adam on the dense layers):

* per-feature: 26 `hash` tables, the rows split by cardinality (the paper's baseline);
* multiplexed: one `multiplexed` table of the same parameters, one probe per feature, so
  the dense model is identical and only the tables differ.

Criteo-like batches (13 dense, 26 sparse of which 3 multi-valued with 0-8 IDs, skewed raw
64-bit IDs, cardinalities log-uniform over 10..1M) are built in memory beforehand. Steps
of the two models alternate in short blocks and are timed in process CPU time, which on
one thread equals wall time on an idle machine but is not inflated when other processes
share the cores; throughput is the median over blocks. The embedding layer alone (ID transform,
lookup, backward with the fused update) and the ID transform alone are measured too:
they bound the shared table's cost from above.

    python bench/multiplexed.py           # dims 16, 32 and 64; 2-4 minutes on 2 shared cores
    python bench/multiplexed.py --quick   # dim 32, under a minute

Goal (issue 5): the shared table costs at most 10% throughput, multiplexed/per-feature >= 0.9
(the smallest ratio over the dims is reported).
Last line: `RESULT multiplexed ratio=<x> goal=0.9 met=yes|no ...`.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from harness import init_single_rank_group, interleaved
from torchrec import KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module

from pipelines.build import build_model
from recsys.batch import Batch
from recsys.config import ExperimentConfig, config_from_dict
from tables.multiplexed import hashed_table_rows, shared_table_rows
from tables.sharding import combined_optimizer, shard_model

BATCH = 4096
NUM_DENSE = 13
FEATURES = [f"C{i}" for i in range(1, 27)]
MULTI = FEATURES[-3:]
MAX_BAG = 8
SPARSE_LR = 0.01
DENSE_LR = 3e-4
GOAL = 0.9


def cardinalities() -> dict[str, int]:
    """Log-uniform from 10 to 1M over the features, as the synthetic Criteo log spreads them."""
    sizes = np.logspace(1, 6, len(FEATURES)).astype(int)
    return dict(zip(FEATURES, sizes.tolist(), strict=True))


def make_batches(count: int, gen: torch.Generator) -> list[Batch]:
    """Skewed ranks (u^4 puts most lookups on a small head) spread over raw 64-bit IDs."""
    cards = torch.tensor(list(cardinalities().values()))
    batches = []
    for _ in range(count):
        lengths = torch.ones(len(FEATURES), BATCH, dtype=torch.int32)
        lengths[-len(MULTI) :] = torch.randint(0, MAX_BAG + 1, (len(MULTI), BATCH), generator=gen)
        per_value = torch.repeat_interleave(cards, lengths.sum(dim=1))
        ranks = (torch.rand(len(per_value), generator=gen) ** 4 * per_value).long()
        keys = torch.repeat_interleave(torch.arange(len(FEATURES)), lengths.sum(dim=1))
        raw = ranks * -7046029254386353131 + keys * 1_000_003  # odd multiplier: distinct IDs
        batches.append(
            Batch(
                dense=torch.rand(BATCH, NUM_DENSE, generator=gen),
                sparse=KeyedJaggedTensor(keys=FEATURES, values=raw, lengths=lengths.reshape(-1)),
                labels=(torch.rand(BATCH, generator=gen) < 0.25).float(),
                timestamps=torch.zeros(BATCH, dtype=torch.int64),
            )
        )
    return batches


def experiment(tables: list[dict], dim: int) -> ExperimentConfig:
    return config_from_dict(
        {
            "name": "bench",
            "features": {
                "dense": [f"I{i}" for i in range(1, NUM_DENSE + 1)],
                "sparse": [{"name": f, "multi_valued": f in MULTI} for f in FEATURES],
            },
            "tables": tables,
            "model": {"name": "dlrm", "dense_arch": [512, 256, dim], "over_arch": [512, 256]},
        }
    )


def configs(rows: int, dim: int) -> dict[str, ExperimentConfig]:
    """Per-feature hashed tables and one multiplexed table, both of `rows * dim` parameters."""
    budget = rows * dim
    split = hashed_table_rows(budget, cardinalities(), dict.fromkeys(FEATURES, dim))
    common = {"embedding_dim": dim, "sharding": "table_wise"}
    per_feature = [
        {"features": [f], "variant": "hash", "num_embeddings": n, **common}
        for f, n in split.items()
    ]
    multiplexed = {
        "name": "shared",
        "features": FEATURES,
        "variant": "multiplexed",
        "num_embeddings": shared_table_rows(budget, dim),
        **common,
    }
    return {
        "per_feature": experiment(per_feature, dim),
        "multiplexed": experiment([multiplexed], dim),
    }


def shard(cfg: ExperimentConfig) -> DistributedModelParallel:
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    return shard_model(
        model,
        {s.name: s.sharding for s in model.sparse.specs},
        "rowwise_adagrad",
        SPARSE_LR,
        dist.GroupMember.WORLD,  # type: ignore[arg-type]
        torch.device("cpu"),
    )


def train_step(dmp: DistributedModelParallel) -> Callable[[Batch], None]:
    optimizer = combined_optimizer(
        dmp, "rowwise_adagrad", SPARSE_LR, lambda ps: torch.optim.Adam(ps, lr=DENSE_LR)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step(batch: Batch) -> None:
        loss = loss_fn(dmp(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def embedding_step(dmp: DistributedModelParallel, dim: int) -> Callable[[Batch], None]:
    """The embedding layer alone: a fixed random projection stands in for the model."""
    sparse = get_unwrapped_module(dmp).sparse
    probe = torch.randn(BATCH, len(FEATURES) * dim, generator=torch.Generator().manual_seed(1))

    def step(batch: Batch) -> None:
        (sparse(batch.sparse).values() * probe).sum().backward()

    return step


def transform_step(dmp: DistributedModelParallel) -> Callable[[Batch], None]:
    """The ID transform alone: raw IDs -> the collection's input."""
    sparse = get_unwrapped_module(dmp).sparse
    return lambda batch: sparse.remap(batch.sparse)


def cpu_rates(
    steps: dict[str, Callable[[Batch], None]], batches: list[Batch], blocks: int, per_block: int
) -> dict[str, float]:
    """Median examples per CPU second: the cost of the code, whatever the neighbours do."""
    return interleaved(steps, batches, blocks, per_block, BATCH, clock=time.process_time)


def measure(rows: int, dim: int, batches: list[Batch], blocks: int) -> dict[str, dict]:
    """examples/s of each model: training step, embedding layer, ID transform."""
    models = {name: shard(cfg) for name, cfg in configs(rows, dim).items()}
    out = {
        "train": cpu_rates({k: train_step(m) for k, m in models.items()}, batches, blocks, 2),
        "embedding": cpu_rates(
            {k: embedding_step(m, dim) for k, m in models.items()}, batches, blocks, 2
        ),
        "transform": cpu_rates(
            {k: transform_step(m) for k, m in models.items()}, batches, blocks, 4
        ),
    }
    specs = {k: get_unwrapped_module(m).sparse.specs for k, m in models.items()}
    out["parameters"] = {k: sum(s.parameters for s in v) for k, v in specs.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="dim 32 only, fewer blocks")
    parser.add_argument("--rows", type=int, default=500_000, help="table rows in all")
    args = parser.parse_args()
    dims, blocks = ([32], 8) if args.quick else ([16, 32, 64], 16)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_single_rank_group()
    batches = make_batches(4, torch.Generator().manual_seed(0))
    ids = sum(int(b.sparse.values().numel()) for b in batches) / len(batches)
    print(
        f"shape: batch {BATCH}, {len(FEATURES)} features ({len(MULTI)} multi-valued, "
        f"{ids / BATCH:.1f} IDs per row), {args.rows:,} table rows in all; median of {blocks} "
        f"alternating blocks, 1 thread, CPU time"
    )
    ratios = {}
    for dim in dims:
        result = measure(args.rows, dim, batches, blocks)
        params = result.pop("parameters")
        print(
            f"dim {dim}: parameters per-feature {params['per_feature']:,}, "
            f"multiplexed {params['multiplexed']:,}"
        )
        for part, rates in result.items():
            ratio = rates["multiplexed"] / rates["per_feature"]
            ratios[(dim, part)] = ratio
            print(
                f"  {part:9s}: per-feature {rates['per_feature']:>10,.0f} ex/s, "
                f"multiplexed {rates['multiplexed']:>10,.0f} ex/s, ratio {ratio:.3f}"
            )
    dist.destroy_process_group()

    worst = min(ratios[(d, "train")] for d in dims)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    per_dim = " ".join(f"train_dim{d}={ratios[(d, 'train')]:.3f}" for d in dims)
    per_dim += " " + " ".join(f"embedding_dim{d}={ratios[(d, 'embedding')]:.3f}" for d in dims)
    per_dim += " " + " ".join(f"transform_dim{d}={ratios[(d, 'transform')]:.3f}" for d in dims)
    print(
        f"RESULT multiplexed ratio={worst:.3f} goal={GOAL} met={'yes' if worst >= GOAL else 'no'} "
        f"{per_dim} rows={args.rows} batch={BATCH} peak_rss_mib={peak:.0f}"
    )


if __name__ == "__main__":
    main()
