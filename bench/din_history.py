"""DIN's cost against its histories' true lengths: forward + backward of DIN next to TWIN.

    python bench/din_history.py [--quick]

Batches of 256 impressions, 16 wide fields (item | category | time, the Taobao recipe),
`din_length` 200 and TWIN's K = 20, on precomputed embeddings (no table lookups, so only
the models are timed). Two history shapes: short (0-20 behaviours, mean 10), where a DIN
padded to its window spends nearly all its work on padding, and long (300-1,000), where
every row fills the window. The models take turns step by step, in alternating order, and
each figure is the median ms per step. One thread.

Goal (issue 19 item 5: DIN attends over each row's true history): on short histories DIN
costs at most twice TWIN. Last line:
`RESULT din_history ratio=<DIN ms / TWIN ms, short> goal=2 met=yes|no ...`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor, nn

from models.sequence import EmbeddingSet, FieldDims, SequenceInputs, build_sequence_model

BATCH = 256
DIMS = FieldDims(16, 16, 16)
SHAPES = {"short": (0, 20), "long": (300, 1000)}


def inputs(low: int, high: int, gen: torch.Generator) -> SequenceInputs:
    """Leaf embeddings for one batch with history lengths uniform in [low, high]."""
    lengths = torch.randint(low, high + 1, (BATCH,), generator=gen)
    lengths[0] = max(int(lengths[0]), 1)  # the batch holds at least one behaviour
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    target = torch.randn(BATCH, DIMS.total, generator=gen).requires_grad_()
    history = torch.randn(int(offsets[-1]), DIMS.total, generator=gen).requires_grad_()
    return SequenceInputs.coupled(EmbeddingSet(target, history), offsets)


def step_ms(model: nn.Module, batch: SequenceInputs, labels: Tensor) -> float:
    start = time.perf_counter()
    loss = nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
    loss.backward()
    return (time.perf_counter() - start) * 1e3


def figures(low: int, high: int, steps: int) -> dict[str, float]:
    """Median ms per forward + backward step of DIN and TWIN on the same batches."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    models = {
        "din": build_sequence_model("din", DIMS, din_length=200),
        "twin": build_sequence_model("twin", DIMS, top_k=20),
    }
    times: dict[str, list[float]] = {name: [] for name in models}
    for step in range(steps + 1):  # step 0 warms up
        batch = inputs(low, high, gen)
        labels = (torch.rand(BATCH, generator=gen) < 0.3).float()
        order = list(models) if step % 2 == 0 else list(models)[::-1]
        for name in order:
            ms = step_ms(models[name], batch, labels)
            if step:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 5 if args.quick else 30
    results = {shape: figures(*bounds, steps) for shape, bounds in SHAPES.items()}
    for shape, (low, high) in SHAPES.items():
        r = results[shape]
        print(
            f"{shape} histories ({low}-{high}), batch {BATCH}, median of {steps} steps: "
            f"DIN {r['din']:.2f} ms, TWIN {r['twin']:.2f} ms ({r['din'] / r['twin']:.2f}x)"
        )
    ratio = results["short"]["din"] / results["short"]["twin"]
    print(
        f"RESULT din_history ratio={ratio:.2f} goal=2 met={'yes' if ratio <= 2 else 'no'} "
        + " ".join(f"{s}_{m}_ms={v:.2f}" for s, r in results.items() for m, v in r.items())
    )


if __name__ == "__main__":
    main()
