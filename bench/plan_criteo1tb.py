"""What torchrec's sharding planner makes of a Criteo-1TB-sized DLRM on 8 and 64 GPUs.

    .venv/bin/python bench/plan_criteo1tb.py [--gpus 8,64] [--hbm-gib 80] [--batch 8192]

No GPU needed: the planner only reads a Topology (world size, 8 GPUs a host, compute device
"cuda", HBM per GPU) and the tables' configs, which sit on the meta device. The tables are
the torchrec DLRM example's Criteo-1TB setting (26 features, its `--num_embeddings_per_feature`
list, dim 128: 178M rows, 91.1 GB of float32 rows), each table with fbgemm's fused row-wise
Adagrad (as the engine trains on CPU, and as the example's `--adagrad` path does).
Printed: per world size, the tables grouped by the sharding type and compute kernel the
planner picked, with their shard counts, and the planner's own estimate of the slowest
rank's step time in its embedding lookups and
communication (not the dense part) and its peak HBM. torchrec's planner logs (its stats table) go to
`--log` (default: none kept), not the console. docs/scale.md shows this script's output.
"""

from __future__ import annotations

import argparse
import io
import logging
import warnings
from collections import defaultdict
from contextlib import redirect_stdout

import torch
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

# torchrec's DLRM example (and MLPerf's uncapped Criteo 1TB) rows per feature, C1..C26.
CRITEO_1TB_ROWS = [
    45833188, 36746, 17245, 7413, 20243, 3, 7114, 1441, 62, 29275261, 1572176, 345138, 10,
    2209, 11267, 128, 4, 974, 14, 48937457, 11316796, 40094537, 452104, 12606, 104, 35,
]  # fmt: skip
DIM = 128
GPUS_PER_HOST = 8


def criteo_1tb_tables() -> EmbeddingBagCollection:
    """The 26 tables on the meta device, with the fused optimizer the sharders read."""
    tables = [
        EmbeddingBagConfig(
            name=f"t_C{i + 1}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"C{i + 1}"]
        )
        for i, rows in enumerate(CRITEO_1TB_ROWS)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    _apply_optimizer_in_backward(RowWiseAdagrad, ebc.parameters(), {"lr": 0.05})
    return ebc


def plan(world_size: int, hbm_gib: float, batch: int) -> tuple[list[ShardingOption], str]:
    """The planner's chosen options for `world_size` GPUs, and its silenced output."""
    chatter = io.StringIO()
    with redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its storage-reservation FutureWarning
        planner = EmbeddingShardingPlanner(
            topology=Topology(
                world_size=world_size,
                local_world_size=min(world_size, GPUS_PER_HOST),
                compute_device="cuda",
                hbm_cap=int(hbm_gib * 2**30),
            ),
            batch_size=batch,
        )
        planner.plan(criteo_1tb_tables(), get_default_sharders())
    # the sharding options behind the returned plan, with the planner's perf and storage
    # estimates per shard (the ShardingPlan itself keeps neither)
    return planner._best_plan or [], chatter.getvalue()


def summary(options: list[ShardingOption], world_size: int) -> list[str]:
    """Tables grouped by (sharding type, kernel), and the planner's per-rank estimates."""
    groups: dict[tuple[str, str], list[ShardingOption]] = defaultdict(list)
    perf = [0.0] * world_size
    hbm = [0] * world_size
    for option in options:
        groups[(option.sharding_type, option.compute_kernel)].append(option)
        for shard in option.shards:
            if shard.rank is not None:
                perf[shard.rank] += shard.perf.total if shard.perf else 0.0
                hbm[shard.rank] += shard.storage.hbm if shard.storage else 0
    lines = [
        f"| {kind} | {kernel} | {len(opts)} | "
        + ", ".join(
            f"{o.name.removeprefix('t_')} ({o.num_shards})"
            for o in sorted(opts, key=lambda o: -o.tensor.shape[0])
        )
        + " |"
        for (kind, kernel), opts in sorted(groups.items())
    ]
    lines.append(
        f"planner's estimate: slowest rank {max(perf):.2f} ms a step, peak HBM "
        f"{max(hbm) / 2**30:.1f} GiB of a rank (tables and optimizer state)"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="8,64", help="world sizes, comma-separated")
    parser.add_argument("--hbm-gib", type=float, default=80.0, help="HBM per GPU (A100/H100 80G)")
    parser.add_argument("--batch", type=int, default=8192, help="batch per GPU")
    parser.add_argument("--log", help="file for torchrec's planner output")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, force=True)  # the planner's INFO stats table
    rows = sum(CRITEO_1TB_ROWS)
    print(
        f"Criteo-1TB-sized DLRM tables: 26, {rows:,} rows, dim {DIM}, "
        f"{rows * DIM * 4 / 1e9:.1f} GB float32 rows; HBM {args.hbm_gib:g} GiB per GPU, "
        f"{GPUS_PER_HOST} GPUs a host, batch {args.batch} per GPU"
    )
    for world_size in (int(g) for g in args.gpus.split(",")):
        options, chatter = plan(world_size, args.hbm_gib, args.batch)
        if args.log:
            with open(args.log, "a") as log:
                log.write(chatter)
        print(f"\n{world_size} GPUs ({-(-world_size // GPUS_PER_HOST)} host(s)):")
        print("| sharding | kernel | tables | tables (shards), largest first |")
        print("| --- | --- | --- | --- |")
        print("\n".join(summary(options, world_size)))


if __name__ == "__main__":
    main()
