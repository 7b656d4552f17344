"""OptEmbed supernet training throughput against plain pooled-table training, same run.

DLRM-like shape: 13 dense features, 26 sparse fields of width 64 (23 single-valued, 3
multi-valued with 0-8 IDs), batch 4096, skewed IDs, the repo's default DLRM on top. All
models are sharded by the repo's `shard_model` (one-rank gloo group, table-wise) with
fbgemm's fused row-wise Adagrad on the tables and Adam on the dense layers:

* plain: `EmbeddingBagCollection` (pooled lookup inside the fused kernel);
* supernet, EC rows: `EmbeddingCollection` (unpooled rows) -> `OptEmbedPooling` (row mask
  from per-field thresholds + per-sample sampled dims, then jagged sum), thresholds on
  their own SGD, loss + the threshold regularizer;
* supernet, pooled rows: the same, with the rows from `EmbeddingBagCollection`s (single-
  valued features' pooled output is their rows, handed over as one block; multi-valued
  ones with one ID per bag). On CPU, fbgemm's unpooled backward is several times slower
  than its pooled one;
* supernet, layer: the pooled-rows supernet as `recsys train` builds it for `variant:
  optembed` (`tables.optembed.embeddings.OptEmbedEmbeddings`: ID transform, pooled rows,
  masks), the figure the RESULT line reports by default.

The supernets mask their single-valued block with `tables.optembed.fused`'s compiled
kernels (compiled in the warm-up step, before timing).

Steps of the models alternate in short blocks so that load from other processes hits all
alike; throughput is the median over blocks. The same is measured for the embedding layer
alone (lookup + masks + pooling, forward and backward with the fused update, no dense
model), which bounds the overhead from above.

    python bench/optembed.py                     # 2-4 minutes on 2 shared cores
    python bench/optembed.py --quick             # under a minute
    python bench/optembed.py --rows-from pooled  # RESULT reports the pooled-rows supernet
                                                 # (default: the pipeline's layer)

Goal (issue 6, raised by issue 20): masked lookup costs at most 10% throughput, i.e.
supernet/plain >= 0.9. Last line: `RESULT optembed ratio=<x> goal=0.9 met=yes|no ...` (every
supernet's figures).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from harness import init_single_rank_group, interleaved
from torch import Tensor, nn
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    KeyedJaggedTensor,
)
from torchrec.distributed.model_parallel import DistributedModelParallel, get_unwrapped_module
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper

from models.ctr import DLRM
from recsys.config import ModelConfig
from tables.optembed.embeddings import OptEmbedEmbeddings
from tables.optembed.pooling import OptEmbedPooling, bag_rows, one_bag_per_id
from tables.pooled import TableSpec
from tables.sharding import dense_parameters, shard_model
from tables.transforms import ModuloHash

BATCH = 4096
NUM_DENSE = 13
NUM_SPARSE = 26
NUM_MULTI = 3
MAX_MULTI_LEN = 8
DIM = 64
SPARSE_LR = 0.01
DENSE_LR = 3e-4
THRESHOLD_LR = 1e-4
ALPHA = 1e-5
GOAL = 0.9  # supernet / plain examples per second
FEATURES = [f"c{i}" for i in range(NUM_SPARSE)]
TABLE_WISE = {f"t_{f}": "table_wise" for f in FEATURES}


@dataclass(frozen=True)
class Batch:
    dense: Tensor
    sparse: KeyedJaggedTensor
    labels: Tensor


def make_batches(count: int, rows: int, gen: torch.Generator) -> list[Batch]:
    """Skewed IDs (u^4 puts most lookups on a small head of each table), random labels."""
    batches = []
    for _ in range(count):
        lengths = torch.ones(NUM_SPARSE, BATCH, dtype=torch.int32)
        multi = torch.randint(0, MAX_MULTI_LEN + 1, (NUM_MULTI, BATCH), generator=gen)
        lengths[-NUM_MULTI:] = multi.int()
        total = int(lengths.sum())
        ids = (torch.rand(total, generator=gen) ** 4 * rows).long()
        batches.append(
            Batch(
                dense=torch.rand(BATCH, NUM_DENSE, generator=gen),
                sparse=KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=lengths.reshape(-1)),
                labels=(torch.rand(BATCH, generator=gen) < 0.25).float(),
            )
        )
    return batches


def bag_tables(features: list[str], rows: int) -> EmbeddingBagCollection:
    """One pooled table per feature, materialised by sharding."""
    return EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f]
            )
            for f in features
        ],
        device=torch.device("meta"),
    )


class PlainModel(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.ebc = bag_tables(FEATURES, rows)
        self.dlrm = DLRM(ModelConfig(), NUM_DENSE, [DIM] * NUM_SPARSE)

    def embed(self, sparse: KeyedJaggedTensor) -> Tensor:
        return self.ebc(sparse).values()

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        return self.dlrm(dense, self.embed(sparse))


class Supernet(nn.Module):
    """Rows per feature (from the subclass's tables) masked and pooled by `OptEmbedPooling`."""

    def __init__(self) -> None:
        super().__init__()
        self.pooling = OptEmbedPooling(FEATURES, list(range(NUM_SPARSE)), [DIM] * NUM_SPARSE)
        self.dlrm = DLRM(ModelConfig(), NUM_DENSE, [DIM] * NUM_SPARSE)

    def embed(self, sparse: KeyedJaggedTensor) -> Tensor:
        raise NotImplementedError

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Tensor:
        return self.dlrm(dense, self.embed(sparse))


class EcSupernet(Supernet):
    """Unpooled rows from an `EmbeddingCollection` (fbgemm's unpooled kernels)."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.ec = EmbeddingCollection(
            tables=[
                EmbeddingConfig(
                    name=f"t_{f}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f]
                )
                for f in FEATURES
            ],
            device=torch.device("meta"),
        )

    def embed(self, sparse: KeyedJaggedTensor) -> Tensor:
        return self.pooling(self.ec(sparse)).values()


class PooledRowsSupernet(Supernet):
    """The same rows through pooled lookups (fbgemm's pooled kernels): the single-valued
    features' pooled output is their rows, handed over as one block; the multi-valued ones
    are looked up with one ID per bag."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.ebc_single = bag_tables(FEATURES[:-NUM_MULTI], rows)
        self.ebc_multi = bag_tables(FEATURES[-NUM_MULTI:], rows)

    def embed(self, sparse: KeyedJaggedTensor) -> Tensor:
        single, multi = sparse.split([NUM_SPARSE - NUM_MULTI, NUM_MULTI])
        rows = bag_rows(self.ebc_multi(one_bag_per_id(multi)), multi)
        return self.pooling(rows, single=self.ebc_single(single)).values()


class LayerSupernet(Supernet):
    """What `recsys train` runs for `variant: optembed`: `OptEmbedEmbeddings` over hash
    storage (IDs here are below the rows, so the modulo keeps them), pooled-row lookups."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        specs = [
            TableSpec(f"t_{f}", (f,), "hash", rows, DIM, "sum", "table_wise") for f in FEATURES
        ]
        self.layer = OptEmbedEmbeddings(
            specs,
            {s.name: ModuloHash(rows) for s in specs},
            single_valued=FEATURES[:-NUM_MULTI],
            alpha=ALPHA,
            device=torch.device("meta"),
        )
        self.pooling = self.layer.pooling

    def embed(self, sparse: KeyedJaggedTensor) -> Tensor:
        return self.layer(sparse).values()


def optimizer_for(dmp: DistributedModelParallel) -> KeyedOptimizer:
    """Fused table optimizer + Adam on dense layers + plain SGD on thresholds (the paper's)."""
    dense = dense_parameters(dmp)
    thresholds = {k: p for k, p in dense.items() if "thresholds" in k}
    network = {k: p for k, p in dense.items() if k not in thresholds}
    optims: list[tuple[str, KeyedOptimizer]] = [
        ("sparse", dmp.fused_optimizer),
        ("dense", KeyedOptimizerWrapper(network, lambda ps: torch.optim.Adam(ps, lr=DENSE_LR))),
    ]
    if thresholds:
        sgd = KeyedOptimizerWrapper(thresholds, lambda ps: torch.optim.SGD(ps, lr=THRESHOLD_LR))
        optims.append(("thresholds", sgd))
    return CombinedOptimizer(optims)


def train_step(dmp: DistributedModelParallel, optimizer: KeyedOptimizer) -> Callable[[Batch], None]:
    module = get_unwrapped_module(dmp)
    loss_fn = nn.BCEWithLogitsLoss()

    def step(batch: Batch) -> None:
        loss = loss_fn(dmp(batch.dense, batch.sparse), batch.labels)
        if isinstance(module, Supernet):
            loss = loss + module.pooling.thresholds.regularizer(ALPHA)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def embedding_step(dmp: DistributedModelParallel) -> Callable[[Batch], None]:
    """The embedding layer alone: a fixed random projection stands in for the model."""
    module = get_unwrapped_module(dmp)
    probe = torch.randn(BATCH, NUM_SPARSE * DIM, generator=torch.Generator().manual_seed(1))

    def step(batch: Batch) -> None:
        loss = (module.embed(batch.sparse) * probe).sum()
        if isinstance(module, Supernet):
            loss = loss + module.pooling.thresholds.regularizer(ALPHA)
        loss.backward()

    return step


def shard(module: nn.Module) -> DistributedModelParallel:
    return shard_model(
        module,
        TABLE_WISE,
        "rowwise_adagrad",
        SPARSE_LR,
        dist.GroupMember.WORLD,  # type: ignore[arg-type]
        torch.device("cpu"),
    )


def keep_freed_memory() -> bool:
    """glibc: serve allocations up to 32 MiB from the heap and keep freed memory there.

    By default the step's large temporaries (tens of MB each) are fresh `mmap`s, faulted in
    page by page every step; a CPU trainer would run with an allocator that reuses them
    (jemalloc, tcmalloc, or these settings). Applied to every model alike.
    """
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    libc = ctypes.CDLL(path)
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all(
        libc.mallopt(option, value) == 1
        for option, value in (
            (m_mmap_threshold, 32 << 20),
            (m_trim_threshold, 4 << 30),
            (m_top_pad, 256 << 20),
        )
    )


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tables, few blocks")
    parser.add_argument(
        "--rows-from",
        choices=["ec", "pooled", "layer"],
        default="layer",
        help="which supernet the RESULT ratio reports (both are measured)",
    )
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's allocator settings alone"
    )
    args = parser.parse_args()
    tuned = False if args.default_malloc else keep_freed_memory()
    rows = 20_000 if args.quick else 50_000
    blocks, per_block = (3, 1) if args.quick else (20, 2)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    init_single_rank_group()
    batches = make_batches(4, rows, torch.Generator().manual_seed(0))
    models = {
        "plain": shard(PlainModel(rows)),
        "ec": shard(EcSupernet(rows)),
        "pooled": shard(PooledRowsSupernet(rows)),
        "layer": shard(LayerSupernet(rows)),
    }
    for name in ("ec", "pooled", "layer"):
        pooling = get_unwrapped_module(models[name]).pooling
        pooling.use_supernet(torch.Generator().manual_seed(2))
    train = {k: train_step(m, optimizer_for(m)) for k, m in models.items()}
    full = interleaved(train, batches, blocks, per_block, BATCH)
    embedding = {k: embedding_step(m) for k, m in models.items()}
    emb = interleaved(embedding, batches, blocks, per_block, BATCH)
    dist.destroy_process_group()

    ratio = {k: full[k] / full["plain"] for k in ("ec", "pooled", "layer")}
    emb_ratio = {k: emb[k] / emb["plain"] for k in ("ec", "pooled", "layer")}
    table_mib = NUM_SPARSE * rows * DIM * 4 / 2**20
    print(
        f"shape: batch {BATCH}, {NUM_SPARSE} fields x {rows:,} rows x dim {DIM} "
        f"({table_mib:.0f} MiB of tables per model), {NUM_MULTI} multi-valued; "
        f"median of {blocks} alternating blocks x {per_block} steps, 1 thread, "
        f"malloc {'tuned' if tuned else 'default'}"
    )
    for title, rates, ratios in (
        ("training step (DLRM)", full, ratio),
        ("embedding layer alone", emb, emb_ratio),
    ):
        print(
            f"{title}: plain {rates['plain']:,.0f} ex/s; supernet on EC rows "
            f"{rates['ec']:,.0f} ex/s (ratio {ratios['ec']:.3f}); supernet on pooled rows "
            f"{rates['pooled']:,.0f} ex/s (ratio {ratios['pooled']:.3f}); the pipeline's "
            f"layer (OptEmbedEmbeddings) {rates['layer']:,.0f} ex/s (ratio {ratios['layer']:.3f})"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB (four models, {4 * table_mib:.0f} MiB of tables)")
    head = args.rows_from
    met = "yes" if ratio[head] >= GOAL else "no"
    print(
        f"RESULT optembed ratio={ratio[head]:.3f} goal={GOAL} met={met} rows_from={head} "
        f"malloc={'tuned' if tuned else 'default'} "
        f"plain_ex_s={full['plain']:.0f} supernet_ec_ex_s={full['ec']:.0f} "
        f"supernet_pooled_ex_s={full['pooled']:.0f} ec_ratio={ratio['ec']:.3f} "
        f"pooled_ratio={ratio['pooled']:.3f} layer_ratio={ratio['layer']:.3f} "
        f"embedding_ec_ratio={emb_ratio['ec']:.3f} embedding_layer_ratio={emb_ratio['layer']:.3f} "
        f"embedding_pooled_ratio={emb_ratio['pooled']:.3f} peak_rss_mib={peak_rss_mib():.0f}"
    )


if __name__ == "__main__":
    main()
