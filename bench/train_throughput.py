"""Training throughput: DLRM on fbgemm TBE tables (the engine's path) against plain
`nn.EmbeddingBag` tables, and one worker against two.

Shape, from conf/criteo_synth.yaml: 13 dense and 26 sparse features (3 multi-valued, bags
of 1..5 IDs), one hashed table per feature of `--rows` rows x dim 64, batch 4096 per
worker, the repo's default DLRM (dense arch 512-256-64, over arch 512-256, dot interaction).
IDs are Zipf-distributed over each table's rows (hot rows scattered by a fixed permutation,
as hashing scatters them). Batches are synthetic and made in memory before any timing: data
loading is not measured here (bench/ingest.py measures it).

* TBE: the engine's model (`pipelines.build.build_model`: hashing transform, torchrec
  `EmbeddingBagCollection`, DLRM) sharded by `tables.sharding.shard_model` over a gloo
  group (dense layers DDP), fbgemm's fused row-wise Adagrad on the tables and Adam on the
  dense layers, through `combined_optimizer`. Tables are table-wise by default, which is
  what the planner itself picks for this shape on two CPU ranks (13 tables each);
  `--sharding row_wise` shows the alternative, whose reduce-scatter of the pooled output
  (global batch x all features) over gloo costs more than two workers gain.
* plain: the same transform and DLRM over one `nn.EmbeddingBag(sparse=True, mode="sum")`
  per feature, sparse `torch.optim.Adagrad` on the tables (same rate and eps as the fused
  update), Adam on the dense layers; no torchrec. The ratio TBE / plain is the one the
  RESULT line reports: both sides run Adagrad on the rows a batch touched, so it measures
  the kernels, not the choice of optimizer.
* plain, row-wise: the same model with row-wise Adagrad written in torch ops on the sparse
  gradient (`SparseRowWiseAdagrad`), the very update the fused kernel applies, so the
  optimizer's arithmetic is equal too.

How fbgemm's row-wise Adagrad (EXACT_ROWWISE_ADAGRAD) differs from torch's Adagrad: torch
keeps a sum of squared gradients per *element* (rows x dim floats, as big as the table) and
divides each element's step by the root of its own sum; the row-wise variant keeps one
float per *row*, adds the mean over the row's dim of its squared (batch-summed) gradient,
and divides the whole row's step by the root of that one sum. Both touch only the rows
of the batch (the sparse gradient is coalesced first, so a row hit twice gets one update
of its summed gradient), both add eps after the square root; the row-wise state reads and
writes dim x fewer bytes, which is the only work the two updates do not share.

Two worker processes (gloo over loopback, one thread each) train the TBE model together,
each on its own batches; a block lasts as long as its slower rank. One worker is rank 0
alone, in a gloo group of its own, while rank 1 sleeps at a barrier: the one-worker TBE
model, both plain models, and the three embedding layers alone (lookup, backward, table update;
no dense model). All configurations take turns in alternating blocks of steps in the same
processes, so that load from other processes hits them alike. The plain model runs on one
worker only: both goals are about one worker or the TBE path, and a plain multi-worker
baseline would replicate all tables and their two dense Adam moments on every rank and
all-reduce sparse gradients, a different design rather than the same model distributed.
Figures are global examples/s, the median over blocks. Each block's CPU time (summed
over ranks) is reported too: on a shared machine examples per CPU-second still show what
the code costs when the wall clock mostly shows the neighbours (note the load averages).

    python bench/train_throughput.py           # 100k rows per table; ~3 minutes on 2 idle cores
    python bench/train_throughput.py --quick   # 20k rows, few blocks; under a minute

Goals (issue 3): TBE >= 2x plain end to end on one worker; two workers >= 1.6x one (TBE).
Last line: `RESULT train_throughput ratio=<tbe/plain> goal=2 met=yes|no scaling=<2w/1w> ...`,
met covering both.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import socket
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import SimpleQueue
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed import ProcessGroup
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from models.ctr import build_ctr_model
from models.ranking import RankingModel
from pipelines.build import build_model
from recsys.batch import Batch
from recsys.config import ExperimentConfig, load_config
from tables.sharding import combined_optimizer, shard_model
from tables.transforms import ModuloHash

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
ONE_WORKER = (  # timed on rank 0 alone
    "tbe",
    "plain",
    "rowwise",
    "tbe_tables",
    "plain_tables",
    "rowwise_tables",
)
NUM_BATCHES = 8  # distinct batches per worker, cycled
WARMUP_STEPS = 2
ADAGRAD_EPS = 1e-8  # what tables.sharding gives the fused row-wise Adagrad
PERMUTATION_SEED = 12345


@dataclass(frozen=True)
class Job:
    """What the workers measure."""

    cfg: ExperimentConfig
    rows: int
    blocks: int
    per_block: int


def bench_config(rows: int, sharding: str) -> ExperimentConfig:
    """The Criteo-like experiment with one hashed table of `rows` rows per feature."""
    cfg = load_config(REPO / "conf" / "criteo_synth.yaml")
    raw = cfg.model_dump()
    raw["tables"] = [
        {**table, "num_embeddings": rows, "sharding": sharding} for table in raw["tables"]
    ]
    return ExperimentConfig.model_validate(raw)


def make_batches(cfg: ExperimentConfig, rows: int, seed: int) -> list[Batch]:
    """Zipf IDs (rank r drawn with weight (r + 1)^-s, mapped to a scattered row), random
    dense features and labels; multi-valued features draw bags of 1..max_bag IDs."""
    synth = cfg.data.synthetic
    batch_size = cfg.train.batch_size
    sparse = cfg.features.sparse
    gen = torch.Generator().manual_seed(seed)
    cdf = torch.arange(1, rows + 1, dtype=torch.float64).pow_(-synth.zipf_exponent).cumsum_(0)
    cdf /= cdf[-1].item()
    rows_of_rank = torch.randperm(rows, generator=torch.Generator().manual_seed(PERMUTATION_SEED))
    batches = []
    for _ in range(NUM_BATCHES):
        lengths = torch.ones(len(sparse), batch_size, dtype=torch.int32)
        for i, feature in enumerate(sparse):
            if feature.multi_valued:
                bags = torch.randint(1, synth.max_bag + 1, (batch_size,), generator=gen)
                lengths[i] = bags.int()
        u = torch.rand(int(lengths.sum()), generator=gen, dtype=torch.float64)
        ids = rows_of_rank[torch.searchsorted(cdf, u).clamp_(max=rows - 1)]
        batches.append(
            Batch(
                dense=torch.rand(batch_size, len(cfg.features.dense), generator=gen),
                sparse=KeyedJaggedTensor(
                    keys=[f.name for f in sparse], values=ids, lengths=lengths.reshape(-1)
                ),
                labels=(torch.rand(batch_size, generator=gen) < 0.25).float(),
                timestamps=torch.zeros(batch_size, dtype=torch.int64),
            )
        )
    return batches


def unique_ids_per_feature(batches: list[Batch]) -> float:
    """Median distinct rows a feature touches per batch: the rows a sparse update writes."""
    counts = [
        int(jt.values().unique().numel())
        for batch in batches
        for jt in batch.sparse.to_dict().values()
    ]
    return statistics.median(counts)


class PlainPooled(nn.Module):
    """The engine's pooled-table interface over plain `nn.EmbeddingBag`s, one per feature,
    behind the same hashing transform, so that only the table storage differs."""

    def __init__(self, features: list[str], rows: int, dim: int) -> None:
        super().__init__()
        self.hash = ModuloHash(rows)
        self.bags = nn.ModuleDict(
            {f: nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for f in features}
        )

    def forward(
        self, features: KeyedJaggedTensor, event_times: torch.Tensor | None = None
    ) -> KeyedTensor:
        per_feature = features.to_dict()
        pooled = [
            self.bags[f](self.hash(jt.values()), jt.offsets()[:-1]) for f, jt in per_feature.items()
        ]
        return KeyedTensor.from_tensor_list(list(per_feature), pooled)


Step = Callable[[Batch], None]


def tbe_steps(cfg: ExperimentConfig, pg: ProcessGroup) -> tuple[Step, Step]:
    """(whole training step, embedding layer alone) for the engine's model sharded over `pg`."""
    t = cfg.train
    # All ranks of the group run on this host; torchrec's planner reads this.
    os.environ["LOCAL_WORLD_SIZE"] = str(pg.size())
    model = build_model(cfg, {}, table_device=torch.device("meta"))
    dmp = shard_model(
        model,
        {s.name: s.sharding for s in model.sparse.specs},
        t.sparse_optimizer,
        t.sparse_lr,
        pg,
        torch.device("cpu"),
    )
    optimizer = combined_optimizer(
        dmp, t.sparse_optimizer, t.sparse_lr, lambda ps: torch.optim.Adam(ps, lr=t.dense_lr)
    )
    sparse = get_unwrapped_module(dmp).sparse
    loss_fn = nn.BCEWithLogitsLoss()
    probe = _probe(cfg)

    def step(batch: Batch) -> None:
        loss = loss_fn(dmp(batch), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def tables(batch: Batch) -> None:
        # The fused optimizer updates the touched rows inside backward.
        (sparse(batch.sparse).values() * probe).sum().backward()

    return step, tables


class SparseRowWiseAdagrad(torch.optim.Optimizer):
    """fbgemm's EXACT_ROWWISE_ADAGRAD in torch ops on sparse gradients: per touched row,
    `sum += mean(g^2)` over its dim, then `w -= lr * g / (sqrt(sum) + eps)`.

    (torchrec's `RowWiseAdagrad` takes dense gradients only, updating every row each step.)
    """

    def __init__(self, params: list[nn.Parameter], lr: float, eps: float) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.coalesce()
                rows, values = grad.indices()[0], grad.values()
                state = self.state[param]
                if not state:
                    state["sum"] = torch.zeros(param.shape[0])
                total = state["sum"].index_add_(0, rows, values.square().mean(1))
                scale = total.index_select(0, rows).sqrt_().add_(group["eps"])
                param.index_add_(0, rows, values / scale.unsqueeze(1), alpha=-group["lr"])


def plain_steps(cfg: ExperimentConfig, rows: int, rowwise: bool) -> tuple[Step, Step]:
    """(whole training step, embedding layer alone) for the plain-torch model, with sparse
    torch Adagrad on the tables, or row-wise Adagrad in torch ops if `rowwise`."""
    dim = cfg.tables[0].embedding_dim
    features = [f.name for f in cfg.features.sparse]
    dense = build_ctr_model(cfg.model, len(cfg.features.dense), [dim] * len(features))
    model = RankingModel(PlainPooled(features, rows, dim), dense)
    tables = list(model.sparse.parameters())
    lr = cfg.train.sparse_lr
    table_optimizer: torch.optim.Optimizer = (
        SparseRowWiseAdagrad(tables, lr=lr, eps=ADAGRAD_EPS)
        if rowwise
        else torch.optim.Adagrad(tables, lr=lr, eps=ADAGRAD_EPS)
    )
    dense_optimizer = torch.optim.Adam(model.dense.parameters(), lr=cfg.train.dense_lr)
    loss_fn = nn.BCEWithLogitsLoss()
    probe = _probe(cfg)

    def step(batch: Batch) -> None:
        loss = loss_fn(model(batch), batch.labels)
        table_optimizer.zero_grad()
        dense_optimizer.zero_grad()
        loss.backward()
        table_optimizer.step()
        dense_optimizer.step()

    def layer(batch: Batch) -> None:
        table_optimizer.zero_grad()
        (model.sparse(batch.sparse).values() * probe).sum().backward()
        table_optimizer.step()

    return step, layer


def _probe(cfg: ExperimentConfig) -> torch.Tensor:
    """A fixed random projection standing in for the dense model when tables run alone."""
    width = len(cfg.features.sparse) * cfg.tables[0].embedding_dim
    return torch.randn(cfg.train.batch_size, width, generator=torch.Generator().manual_seed(1))


def warm_up(steps: list[Step], batches: list[Batch]) -> None:
    """First calls allocate optimizer state and kernel workspaces; none of it is timed."""
    for step in steps:
        for i in range(WARMUP_STEPS):
            step(batches[i])


def cpu_seconds() -> float:
    """CPU time of this process, all threads; a rank blocked on a collective spends none."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_blocks(
    steps: dict[str, Step], batches: list[Batch], blocks: int, per_block: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall seconds, CPU seconds) per block for each step kind, kinds alternating in order
    block by block.

    Ranks start each block together. Its wall time is the slowest rank's, since a
    data-parallel step is only done when every rank is; its CPU time is the sum over ranks,
    which load from other processes hardly changes, unlike the wall time.
    """
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(blocks):
        order = list(steps) if block % 2 == 0 else list(reversed(steps))
        for name in order:
            dist.barrier()
            start, cpu_start = time.perf_counter(), cpu_seconds()
            for i in range(per_block):
                steps[name](batches[(block * per_block + i) % len(batches)])
            elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
            busy = torch.tensor(cpu_seconds() - cpu_start, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            dist.all_reduce(busy)
            wall[name].append(float(elapsed))
            cpu[name].append(float(busy))
    return wall, cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quiet_torchrec() -> None:
    """torchrec's deprecation notices about its own internals say nothing about throughput."""
    warnings.simplefilter("ignore", FutureWarning)
    for name in ("torchrec", "torch.fx._symbolic_trace"):
        logging.getLogger(name).setLevel(logging.ERROR)


def idle(batch: Batch) -> None:
    """What the other ranks do while rank 0 times a one-worker configuration."""


def measure(rank: int, port: int, job: Job) -> dict[str, Any]:
    """One rank: build, warm up, time; its figures.

    Every rank holds its shard of the two-worker TBE model; rank 0 also builds the
    one-worker models in a gloo group of its own, after the shard, so that its peak RSS
    after each build tells what each model added.
    """
    torch.set_num_threads(1)
    quiet_torchrec()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    rss = {"imports": peak_rss_mib()}
    try:
        alone = dist.new_group([0])  # every rank must take part in creating it
        batches = make_batches(job.cfg, job.rows, seed=rank)
        tbe_2w, _ = tbe_steps(job.cfg, dist.GroupMember.WORLD)  # type: ignore[arg-type]
        warm_up([tbe_2w], batches)
        rss["tbe_2w"] = peak_rss_mib()
        steps = {"tbe_2w": tbe_2w} | dict.fromkeys(ONE_WORKER, idle)
        if rank == 0:
            tbe, tbe_tables = tbe_steps(job.cfg, alone)
            warm_up([tbe, tbe_tables], batches)
            rss["tbe"] = peak_rss_mib()
            plain, plain_tables = plain_steps(job.cfg, job.rows, rowwise=False)
            warm_up([plain, plain_tables], batches)
            rss["plain"] = peak_rss_mib()
            rowwise, rowwise_tables = plain_steps(job.cfg, job.rows, rowwise=True)
            warm_up([rowwise, rowwise_tables], batches)
            rss["rowwise"] = peak_rss_mib()
            steps |= {
                "tbe": tbe,
                "plain": plain,
                "rowwise": rowwise,
                "tbe_tables": tbe_tables,
                "plain_tables": plain_tables,
                "rowwise_tables": rowwise_tables,
            }
        wall, cpu = timed_blocks(steps, batches, job.blocks, job.per_block)
        return {
            "rank": rank,
            "wall": wall,
            "cpu": cpu,
            "rss_mib": rss,
            "unique_ids": unique_ids_per_feature(batches),
        }
    finally:
        dist.destroy_process_group()


def spawned_rank(rank: int, port: int, job: Job, results: SimpleQueue[dict[str, Any]]) -> None:
    results.put(measure(rank, port, job))


def run_workers(job: Job) -> list[dict[str, Any]]:
    """Spawn the ranks of `job`; their figures, by rank.

    Fresh processes, not this one: Linux carries the peak RSS across fork and exec. The
    results are a few hundred bytes per rank, so the queue's pipe holds them until the join.
    """
    results: SimpleQueue[dict[str, Any]] = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        spawned_rank, args=(free_port(), job, results), nprocs=WORKERS, start_method="spawn"
    )
    return sorted((results.get() for _ in range(WORKERS)), key=lambda r: r["rank"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rate(seconds: list[float], examples_per_block: int) -> float:
    return statistics.median(examples_per_block / s for s in seconds)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k rows per table, few blocks")
    parser.add_argument("--rows", type=int, help="rows per table (overrides --quick)")
    parser.add_argument(
        "--sharding",
        choices=["table_wise", "row_wise"],
        default="table_wise",
        help="how the TBE tables are sharded over the workers",
    )
    args = parser.parse_args()
    rows = args.rows or (20_000 if args.quick else 100_000)
    blocks, per_block = (4, 1) if args.quick else (20, 3)

    cfg = bench_config(rows, args.sharding)
    batch_size = cfg.train.batch_size
    num_sparse = len(cfg.features.sparse)
    dim = cfg.tables[0].embedding_dim
    table_mib = rows * dim * 4 / 2**20
    print(
        f"shape: batch {batch_size} per worker, {len(cfg.features.dense)} dense, {num_sparse} "
        f"sparse ({sum(f.multi_valued for f in cfg.features.sparse)} multi-valued, bags of "
        f"1..{cfg.data.synthetic.max_bag}), dim {dim}, {rows:,} rows per table, Zipf "
        f"{cfg.data.synthetic.zipf_exponent} IDs; DLRM {cfg.model.dense_arch} / "
        f"{cfg.model.over_arch}"
    )
    print(
        f"tables: {table_mib:.1f} MiB each, {num_sparse * table_mib:.0f} MiB for all; optimizer "
        f"state: row-wise Adagrad {num_sparse * rows * 4 / 2**20:.1f} MiB, torch Adagrad "
        f"{num_sparse * table_mib:.0f} MiB (one sum per element)"
    )
    print(
        f"data: {NUM_BATCHES} synthetic batches per worker made before timing (loading not "
        f"measured); {WARMUP_STEPS} warm-up steps, then the median of {blocks} blocks x "
        f"{per_block} steps; 1 thread per process"
    )
    print(f"load average before: {load_average()}")
    ranks = run_workers(Job(cfg, rows, blocks, per_block))
    print(f"load average after: {load_average()}")

    wall, cpu = ranks[0]["wall"], ranks[0]["cpu"]  # the same on every rank
    examples = batch_size * per_block
    tbe, plain = rate(wall["tbe"], examples), rate(wall["plain"], examples)
    tbe_tables = rate(wall["tbe_tables"], examples)
    plain_tables = rate(wall["plain_tables"], examples)
    rowwise = rate(wall["rowwise"], examples)
    rowwise_tables = rate(wall["rowwise_tables"], examples)
    tbe_2w = rate(wall["tbe_2w"], WORKERS * examples)
    ratio, scaling = tbe / plain, tbe_2w / tbe
    print(
        f"distinct rows per feature and batch: {ranks[0]['unique_ids']:.0f} (median, of "
        f"{batch_size} samples)"
    )
    print(
        f"1 worker: TBE {tbe:,.0f} ex/s; plain (torch Adagrad) {plain:,.0f} ex/s, ratio "
        f"{ratio:.2f}; plain row-wise Adagrad {rowwise:,.0f} ex/s, ratio {tbe / rowwise:.2f}"
    )
    print(
        f"1 worker, embedding layer alone: TBE {tbe_tables:,.0f} ex/s; plain "
        f"{plain_tables:,.0f} ex/s, ratio {tbe_tables / plain_tables:.2f}; plain row-wise "
        f"{rowwise_tables:,.0f} ex/s, ratio {tbe_tables / rowwise_tables:.2f}; share of the "
        f"step's time in the tables: TBE {tbe / tbe_tables:.0%}, plain {plain / plain_tables:.0%}"
        f", plain row-wise {rowwise / rowwise_tables:.0%}"
    )
    # With free tables the TBE step would take only its non-table time.
    free_tables = (1 / plain) / (1 / tbe - 1 / tbe_tables)
    print(
        f"end-to-end ratio if the TBE tables took no time at all: {free_tables:.2f} "
        "(the dense model's time bounds what faster tables can give)"
    )
    print(
        f"{WORKERS} workers ({args.sharding}): TBE {tbe_2w:,.0f} ex/s global; scaling {scaling:.2f}"
    )
    tbe_cpu, plain_cpu = rate(cpu["tbe"], examples), rate(cpu["plain"], examples)
    tbe_2w_cpu = rate(cpu["tbe_2w"], WORKERS * examples)
    print(
        f"examples per CPU-second, which waiting and other processes' load hardly change: "
        f"1 worker TBE {tbe_cpu:,.0f}, plain {plain_cpu:,.0f} (ratio {tbe_cpu / plain_cpu:.2f}); "
        f"{WORKERS} workers TBE {tbe_2w_cpu:,.0f} (all ranks' CPU); scaling if every rank had "
        f"a core to itself and never waited: {WORKERS * tbe_2w_cpu / tbe_cpu:.2f}"
    )
    rss = [r["rss_mib"] for r in ranks]
    print(
        f"peak RSS, rank 0: {rss[0]['imports']:.0f} MiB after imports, {rss[0]['tbe_2w']:.0f} "
        f"with its {WORKERS}-worker shard, {rss[0]['tbe']:.0f} with the 1-worker TBE model "
        f"added, {rss[0]['plain']:.0f} with the plain model added, {rss[0]['rowwise']:.0f} "
        f"with the plain row-wise one; other ranks: "
        + ", ".join(f"{r['tbe_2w']:.0f}" for r in rss[1:])
        + f" MiB with their {WORKERS}-worker shard"
    )
    met = "yes" if ratio >= 2 and scaling >= 1.6 else "no"
    scaling_met = "yes" if scaling >= 1.6 else "no"
    print(
        f"RESULT train_throughput ratio={ratio:.2f} goal=2 met={met} scaling={scaling:.2f} "
        f"scaling_goal=1.6 scaling_met={scaling_met} tbe_ex_s={tbe:.0f} plain_ex_s={plain:.0f} "
        f"tbe_2w_ex_s={tbe_2w:.0f} vs_rowwise={tbe / rowwise:.2f} "
        f"tables_ratio={tbe_tables / plain_tables:.2f} "
        f"peak_rss_mib={max(max(r.values()) for r in rss):.0f}"
    )


if __name__ == "__main__":
    main()
