"""Where a training step's time goes: the demo model's step split into its parts, each
timed alone and next to its own limit, and the whole step against the sum of its parts.

The model is conf/demo.yaml's (DLRM over one shared table of 27 features, dim 16),
built by `pipelines.build.build_model` from vocabularies of a synthetic demo log made in
the run, and sharded as `recsys train` shards it (one worker: a gloo group of one, fused
row-wise Adagrad in backward, Adam on the dense layers). Parts, as the worker runs them:

* build: Arrow table -> `Batch` (dense columns, KJT) by `recsys.batch.BatchConverter`;
* lookup: the sharded embedding module's forward (ID remap + TBE pooling), no grad;
* embedding backward: lookup forward + backward with a fixed output gradient (the fused
  optimizer updates the touched rows inside it), less the lookup alone;
* dense: the DLRM's forward + BCE + backward on the pooled embeddings as a leaf;
* optimizer: `zero_grad` + `step` of the combined optimizer (Adam on the dense layers;
  the fused sparse update already ran in backward);
* metrics: `Meter.add` each step and its running-AUC snapshot every `log_every` steps.

Limits measured in the same run: the lookup's bytes (rows read + pooled output written)
per second against `index_select` of the same rows from a tensor of the table's shape and
against a `clone` of as many bytes (memory bandwidth); the dense part against a bare
`nn.Sequential` (Linear + ReLU) forward/backward of the same bottom and top MLP shapes.
torchrec's `TrainPipelineSparseDist` is tried on the same model and batches; where it
cannot run, the error is printed. One worker only (no two-worker run yet). Each figure
is the median over blocks of `log_every` steps (so each block holds one metrics
snapshot), 1 intra-op thread.

    python bench/step_breakdown.py           # 100k-row log, 15 blocks; ~1 minute
    python bench/step_breakdown.py --quick   # 20k-row log, 4 blocks; ~30 seconds

Goal (issue 20): a step at most 1.2x the sum of its parts measured alone.
Last line: `RESULT step_breakdown ratio=<step/sum of parts> goal=1.2 met=yes|no ...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module
from torchrec.streamable import Pipelineable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import init_single_rank_group, shard_for_training
from train_throughput import peak_rss_mib, quiet_torchrec

from pipelines.build import build_model
from pipelines.train.meter import Meter
from recsys.batch import Batch, BatchConverter
from recsys.config import ExperimentConfig, load_config
from recsys.synth import generate
from tables.footprint import table_bytes
from tables.vocab import build_vocabularies

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.2


def demo_tables(cfg: ExperimentConfig, rows: int, out: Path) -> tuple[list[pa.Table], dict]:
    """The demo log of `rows` rows in batch-size Arrow tables, and its vocabularies."""
    generate(cfg, rows, out)
    vocabularies = build_vocabularies(cfg, out)
    files = sorted(out.rglob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f) for f in files).combine_chunks()
    size = cfg.train.batch_size
    tables = [table.slice(i, size) for i in range(0, table.num_rows - size + 1, size)]
    return tables, vocabularies


def block_median(fn: Callable[[int], None], blocks: int, per_block: int) -> float:
    """Median seconds per call over `blocks` blocks of `per_block` calls (call i gets i)."""
    times = []
    for block in range(blocks):
        start = time.perf_counter()
        for i in range(per_block):
            fn(block * per_block + i)
        times.append((time.perf_counter() - start) / per_block)
    return statistics.median(times)


def bare_mlp(dense: nn.Module) -> tuple[nn.Sequential, nn.Sequential, int, int]:
    """Linear + ReLU stacks of the DLRM's bottom and top layer shapes, nothing else."""

    def stack(module: nn.Module) -> nn.Sequential:
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        layers: list[nn.Module] = []
        for linear in linears:
            layers += [nn.Linear(linear.in_features, linear.out_features), nn.ReLU()]
        return nn.Sequential(*layers[:-1])

    bottom, top = stack(dense.bottom), stack(dense.top)
    return bottom, top, bottom[0].in_features, top[0].in_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k-row log, 4 blocks")
    args = parser.parse_args()
    rows, blocks = (20_000, 4) if args.quick else (100_000, 15)
    torch.set_num_threads(1)
    quiet_torchrec()
    cfg = load_config(REPO / "conf" / "demo.yaml")
    per_block = cfg.train.log_every
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    with tempfile.TemporaryDirectory() as tmp:
        tables, vocabularies = demo_tables(cfg, rows, Path(tmp) / "log")
        meter = Meter(Path(tmp), world=1)
        rss_data = peak_rss_mib()
        os.environ["LOCAL_WORLD_SIZE"] = "1"  # torchrec's planner: one rank on this host
        init_single_rank_group()
        model = build_model(cfg, vocabularies, table_device=torch.device("meta"))
        sizes = table_bytes(model, cfg.train.sparse_optimizer)
        dmp, optimizer = shard_for_training(model, cfg, model.table_sharding())
        unwrapped = get_unwrapped_module(dmp)
        sparse, dense = unwrapped.sparse, unwrapped.dense
        loss_fn = nn.BCEWithLogitsLoss()
        convert = BatchConverter(cfg.features)
        batches = [convert(t) for t in tables]
        n = len(batches)

        def at(i: int) -> Batch:
            return batches[i % n]

        def step(i: int) -> None:
            batch = convert(tables[i % n])
            logits = dmp(batch)
            loss = loss_fn(logits, batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            meter.add(logits, batch.labels, float(loss.detach()))
            if (i + 1) % per_block == 0:
                meter.snapshot(i, 0)

        pooled = [sparse(b.sparse, b.timestamps).values().detach() for b in batches]
        grad_out = torch.randn_like(pooled[0])
        logits_of = [dense(b.dense, p).detach() for b, p in zip(batches, pooled, strict=True)]

        def build(i: int) -> None:
            convert(tables[i % n])

        def lookup(i: int) -> None:
            with torch.no_grad():
                sparse(at(i).sparse, at(i).timestamps)

        def lookup_backward(i: int) -> None:
            sparse(at(i).sparse, at(i).timestamps).values().backward(grad_out)

        def remap(i: int) -> None:
            sparse.remap(at(i).sparse, at(i).timestamps)

        def dense_part(i: int) -> None:
            dense.zero_grad()
            leaf = pooled[i % n].requires_grad_(True)
            loss_fn(dense(at(i).dense, leaf), at(i).labels).backward()

        vectors = torch.randn(cfg.train.batch_size, dense.num_chunks + 1, dense.dim)
        vectors.requires_grad_(True)

        def interaction(i: int) -> None:
            dense.interaction(vectors).sum().backward()

        # Adam skips parameters without a gradient: give each dense one, as backward would.
        dense_grads = [(p, torch.randn_like(p)) for p in dense.parameters()]

        def optimizer_part(i: int) -> None:
            for param, grad in dense_grads:
                param.grad = grad
            optimizer.step()
            optimizer.zero_grad()

        def metrics(i: int) -> None:
            meter.add(logits_of[i % n], at(i).labels, 0.5)
            if (i + 1) % per_block == 0:
                meter.snapshot(i, 0)

        # Limits: the lookup's rows gathered by index_select and a streaming copy.
        table_rows = sum(s.num_rows for s in model.sparse.specs)
        dim = model.sparse.specs[0].dim
        store = torch.randn(table_rows, dim)
        ids = [sparse.remap(b.sparse, b.timestamps).values() for b in batches]
        lookup_bytes = statistics.median(
            (len(r) + p.numel() // dim) * dim * 4 for r, p in zip(ids, pooled, strict=True)
        )
        stream = torch.randn(int(lookup_bytes) // 4)

        def gather(i: int) -> None:
            store.index_select(0, ids[i % n])

        def copy(i: int) -> None:
            stream.clone()

        bottom, top, bottom_in, top_in = bare_mlp(dense)
        size = cfg.train.batch_size
        x_bottom, x_top = torch.randn(size, bottom_in), torch.randn(size, top_in)
        x_top.requires_grad_(True)  # in the model the top's input gradient feeds the tables

        def bare(i: int) -> None:
            bottom(x_bottom).sum().backward()
            top(x_top).sum().backward()

        def loop(i: int) -> None:
            batch = at(i)
            loss = loss_fn(dmp(batch), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        timed: dict[str, Callable[[int], None]] = {
            "build": build,
            "lookup": lookup,
            "remap": remap,
            "lookup+backward": lookup_backward,
            "dense": dense_part,
            "interaction": interaction,
            "optimizer": optimizer_part,
            "metrics": metrics,
            "step": step,
            "loop": loop,
            "gather": gather,
            "copy": copy,
            "bare_mlp": bare,
        }
        for fn in timed.values():  # warm-up: optimizer state, workspaces
            for i in range(3):
                fn(i)
        t = {name: block_median(fn, blocks, per_block) for name, fn in timed.items()}
        pipeline_line, pipeline_s = try_pipeline(
            dmp, optimizer, loss_fn, batches, blocks, per_block
        )
        load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())

    parts = {
        "build (Arrow -> Batch/KJT)": t["build"],
        "embedding lookup forward": t["lookup"],
        "embedding backward + fused update": max(t["lookup+backward"] - t["lookup"], 0.0),
        "dense forward + backward": t["dense"],
        "optimizer (zero_grad + Adam)": t["optimizer"],
        "metrics (Meter)": t["metrics"],
    }
    total = sum(parts.values())
    ratio = t["step"] / total
    ms = 1e3
    print(
        f"demo model: {len(cfg.features.dense)} dense, {len(cfg.features.sparse)} sparse "
        f"features over {len(model.sparse.specs)} table(s) of {table_rows:,} rows x dim {dim}; "
        f"DLRM {cfg.model.dense_arch} / {cfg.model.over_arch}; batch {size}; 1 worker, "
        f"1 thread; {len(tables)} batches from a {rows:,}-row synthetic demo log"
    )
    print(
        f"timing: median of {blocks} blocks x {per_block} calls; load {load_before} -> {load_after}"
    )
    print(f"{'part':<36}{'ms/step':>10}{'share':>8}")
    for name, sec in parts.items():
        print(f"{name:<36}{sec * ms:>10.3f}{sec / total:>8.0%}")
    print(f"{'sum of parts':<36}{total * ms:>10.3f}")
    print(
        f"{'full step (measured)':<36}{t['step'] * ms:>10.3f}   ratio {ratio:.2f} (goal <= {GOAL})"
    )
    mlps = t["dense"] - t["interaction"]
    lookup_rate = lookup_bytes / t["lookup"]
    gather_rate, copy_rate = lookup_bytes / t["gather"], 2 * lookup_bytes / t["copy"]
    print(
        f"lookup limit: {lookup_bytes / 2**20:.2f} MiB per step (rows read + pooled written); "
        f"lookup {lookup_rate / 1e9:.2f} GB/s, index_select of the same rows "
        f"{gather_rate / 1e9:.2f} GB/s (lookup {lookup_rate / gather_rate:.2f} of it), "
        f"clone of as many bytes {copy_rate / 1e9:.2f} GB/s read+write "
        f"(lookup {lookup_rate / copy_rate:.2f} of it); of the lookup, the ID remap (raw ID -> "
        f"row, before TBE) takes {t['remap'] * ms:.3f} ms, TBE pooling the other "
        f"{(t['lookup'] - t['remap']) * ms:.3f} ms"
    )
    print(
        f"dense limit: bare nn.Sequential fwd+bwd of the same MLP shapes {t['bare_mlp'] * ms:.3f}"
        f" ms; dense part {t['dense'] * ms:.3f} ms ({t['dense'] / t['bare_mlp']:.2f}x); the dot "
        f"interaction fwd+bwd alone {t['interaction'] * ms:.3f} ms, so MLPs + BCE "
        f"{mlps * ms:.3f} ms ({mlps / t['bare_mlp']:.2f}x bare)"
    )
    print(
        f"plain loop on prebuilt batches (forward, loss, backward, step; no build, no metrics):"
        f" {t['loop'] * ms:.3f} ms/step"
    )
    print(pipeline_line)
    if pipeline_s:
        print(f"pipeline vs plain loop: {t['loop'] / pipeline_s:.2f}x the plain loop's speed")
    total_bytes = sum(sizes.values())
    print(
        f"memory: tables + optimizer state {total_bytes / 2**20:.2f} MiB; peak RSS "
        f"{rss_data:.0f} MiB after making the log, {peak_rss_mib():.0f} MiB at the end"
    )
    met = "yes" if ratio <= GOAL else "no"
    pipe = f" pipeline_ms={pipeline_s * ms:.3f}" if pipeline_s else " pipeline=failed"
    print(
        f"RESULT step_breakdown ratio={ratio:.2f} goal={GOAL} met={met} "
        f"step_ms={t['step'] * ms:.3f} parts_ms={total * ms:.3f} "
        f"lookup_vs_gather={lookup_rate / gather_rate:.2f} "
        f"lookup_vs_copy={lookup_rate / copy_rate:.2f} "
        f"dense_vs_bare={t['dense'] / t['bare_mlp']:.2f} loop_ms={t['loop'] * ms:.3f}{pipe} "
        f"peak_rss_mib={peak_rss_mib():.0f} workers=1"
    )


@dataclass
class _PipelinedBatch(Batch, Pipelineable):
    """`Batch` declared as torchrec's `Pipelineable` (it has `to` and `record_stream`)."""

    @classmethod
    def of(cls, batch: Batch) -> _PipelinedBatch:
        return cls(**{f.name: getattr(batch, f.name) for f in fields(Batch)})


class _WithLoss(nn.Module):
    """What torchrec's pipelines call: batch -> (loss, logits)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch)
        return self.loss_fn(logits, batch.labels), logits


def try_pipeline(
    dmp: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    batches: list[Batch],
    blocks: int,
    per_block: int,
) -> tuple[str, float | None]:
    """ms per step under `TrainPipelineSparseDist` and the line saying so, or its error."""
    try:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        wrapped = _WithLoss(dmp, loss_fn)
        pipeline = TrainPipelineSparseDist(wrapped, optimizer, torch.device("cpu"))
        steps = blocks * per_block + 3
        source = iter([_PipelinedBatch.of(batches[i % len(batches)]) for i in range(steps + 2)])
        for _ in range(3):
            pipeline.progress(source)
        times = []
        for _ in range(blocks):
            start = time.perf_counter()
            for _ in range(per_block):
                pipeline.progress(source)
            times.append((time.perf_counter() - start) / per_block)
        sec = statistics.median(times)
        # Modules whose input distribution the pipeline moved ahead of the step (private).
        pipelined = len(getattr(pipeline, "_pipelined_modules", []))
        line = (
            f"TrainPipelineSparseDist (CPU, prebuilt batches): {sec * 1e3:.3f} ms/step; "
            f"{pipelined} sharded module(s) pipelined"
        )
        if not pipelined:
            line += (
                " (the tables read the KJT that PooledEmbeddings.forward remaps from the "
                "batch, not a batch attribute, so the pipeline finds no input distribution "
                "to run ahead and falls back to the plain step)"
            )
        return line, sec
    except Exception as error:  # reported in the output, not hidden
        return f"TrainPipelineSparseDist did not run on CPU: {type(error).__name__}: {error}", None


if __name__ == "__main__":
    main()
