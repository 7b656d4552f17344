"""Long-sequence benchmark: stage-1 search time against the attention width, and DARE's
end-to-end training speed against the coupled TWIN model.

Search: `search_top_k` (K = 20) for 1,000 users with histories of 2,000 behaviours each, on
attention vectors item | category | time with every field d_a wide, for d_a = 64, 32, 16
and 8, against the coupled model's search (TWIN, d = 64 per field) in the same run. Users
are searched in batches of 125; the configurations take turns round by round (in
alternating order) so that load from other processes hits them alike, and each figure is
the median over rounds.

Training: examples/s of whole training steps (lookups in plain `nn.Embedding` tables,
forward, backward, Adam) of DARE (attention d_a = 32, representation d = 64 per field)
and TWIN (d = 64), taking turns step by step on the same batches of 2,000-long histories.

One thread throughout.

    python bench/long_sequence.py           # under 2 minutes on 2 shared cores
    python bench/long_sequence.py --quick   # under a minute

Goal (issue 7, SPECS 4: halving the attention width about halves the search): coupled
search time / d_a = 32 search time >= 1.6.
Last line: `RESULT long_sequence ratio=<x> goal=1.6 met=yes|no search_ms_per_1000_...`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from models.search import search_top_k
from models.sequence import (
    EmbeddingSet,
    FieldDims,
    SequenceInputs,
    build_sequence_model,
)
from tables.sequence import reverse_positions

HISTORY = 2_000
USERS = 1_000
SEARCH_BATCH = 125
TOP_K = 20
ATTENTION_WIDTHS = (64, 32, 16, 8)
COUPLED = FieldDims(64, 64, 64)
DARE_ATTENTION = FieldDims(32, 32, 32)
ITEMS, CATEGORIES = 100_000, 1_000


def uniform(d: int) -> FieldDims:
    return FieldDims(d, d, d)


def alternating(names: list[str], turn: int) -> list[str]:
    """`names` forwards on even turns and backwards on odd ones, so that no configuration
    always runs first (after another one's memory traffic) or last."""
    return names if turn % 2 == 0 else names[::-1]


def search_ms_per_1000(dims: FieldDims, rounds: int, gen: torch.Generator) -> Iterator[float]:
    """One timing per round: ms to search USERS users in batches of SEARCH_BATCH."""
    target = torch.randn(SEARCH_BATCH, dims.total, generator=gen)
    history = torch.randn(SEARCH_BATCH * HISTORY, dims.total, generator=gen)
    offsets = torch.arange(SEARCH_BATCH + 1) * HISTORY
    search_top_k(target, history, offsets, dims.time, TOP_K)  # warm-up
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(USERS // SEARCH_BATCH):
            search_top_k(target, history, offsets, dims.time, TOP_K)
        yield (time.perf_counter() - start) * 1e3


def search_figures(rounds: int) -> dict[str, float]:
    """Median ms per 1,000 users for the coupled model and each attention width."""
    gen = torch.Generator().manual_seed(0)
    configs = {"coupled": COUPLED} | {f"da{d}": uniform(d) for d in ATTENTION_WIDTHS}
    timers = {name: search_ms_per_1000(dims, rounds, gen) for name, dims in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for i in range(rounds):
        for name in alternating(list(timers), i):
            times[name].append(next(timers[name]))
    return {name: statistics.median(t) for name, t in times.items()}


class Tables(nn.Module):
    """One embedding set in plain tables: item, category and time-position."""

    def __init__(self, dims: FieldDims) -> None:
        super().__init__()
        self.item = nn.Embedding(ITEMS, dims.item)
        self.category = nn.Embedding(CATEGORIES, dims.category)
        self.time = nn.Embedding(HISTORY + 1, dims.time)

    def forward(self, items: Tensor, positions: Tensor) -> Tensor:
        fields = [self.item(items), self.category(items % CATEGORIES), self.time(positions)]
        return torch.cat(fields, dim=-1)

    def embed(self, targets: Tensor, history: Tensor, positions: Tensor) -> EmbeddingSet:
        return EmbeddingSet(self(targets, torch.zeros_like(targets)), self(history, positions))


class Trainer:
    """A model with its tables and optimizer; `step` runs one training step on a batch."""

    def __init__(self, name: str, attention: FieldDims | None) -> None:
        extra = {"attention_dims": attention} if attention else {}
        self.model = build_sequence_model(name, COUPLED, top_k=TOP_K, **extra)
        self.representation = Tables(COUPLED)
        self.attention = Tables(attention) if attention else None
        modules = [self.model, self.representation, self.attention]
        params = [p for m in modules if m is not None for p in m.parameters()]
        self.optimizer = torch.optim.Adam(params, lr=0.01)

    def step(self, targets: Tensor, history: Tensor, offsets: Tensor, labels: Tensor) -> None:
        positions = reverse_positions(offsets)
        rep = self.representation.embed(targets, history, positions)
        if self.attention is None:
            inputs = SequenceInputs.coupled(rep, offsets)
        else:
            att = self.attention.embed(targets, history, positions)
            inputs = SequenceInputs(att, rep, offsets)
        loss = nn.functional.binary_cross_entropy_with_logits(self.model(inputs), labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()


def training_figures(batch: int, steps: int) -> dict[str, float]:
    """Examples/s of DARE and TWIN, alternating steps on the same random batches."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    trainers = {"dare": Trainer("dare", DARE_ATTENTION), "twin": Trainer("twin", None)}
    seconds = dict.fromkeys(trainers, 0.0)
    offsets = torch.arange(batch + 1) * HISTORY
    for step in range(steps + 1):  # step 0 warms up
        targets = torch.randint(0, ITEMS, (batch,), generator=gen)
        history = torch.randint(0, ITEMS, (batch * HISTORY,), generator=gen)
        labels = (torch.rand(batch, generator=gen) < 0.3).float()
        for name in alternating(list(trainers), step):
            start = time.perf_counter()
            trainers[name].step(targets, history, offsets, labels)
            if step:
                seconds[name] += time.perf_counter() - start
    return {name: batch * steps / s for name, s in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, batch, steps = (3, 32, 3) if args.quick else (15, 128, 10)

    search = search_figures(rounds)
    print(
        f"stage-1 search, {USERS} users x {HISTORY} behaviours, K={TOP_K}, "
        f"median of {rounds} rounds (ms per 1000 users):"
    )
    print(f"  coupled TWIN d=64 (width {COUPLED.total}): {search['coupled']:.1f}")
    for d in ATTENTION_WIDTHS:
        speedup = search["coupled"] / search[f"da{d}"]
        print(f"  DARE d_a={d} (width {uniform(d).total}): {search[f'da{d}']:.1f} ({speedup:.2f}x)")
    rates = training_figures(batch, steps)
    print(
        f"training, batches of {batch} x {HISTORY} behaviours, {steps} steps: "
        f"DARE (d_a=32, d_r=64) {rates['dare']:.1f} examples/s, "
        f"TWIN (d=64) {rates['twin']:.1f} examples/s"
    )
    ratio = search["coupled"] / search["da32"]
    widths = " ".join(f"search_ms_per_1000_da{d}={search[f'da{d}']:.1f}" for d in ATTENTION_WIDTHS)
    print(
        f"RESULT long_sequence ratio={ratio:.2f} goal=1.6 met={'yes' if ratio >= 1.6 else 'no'} "
        f"search_ms_per_1000_coupled={search['coupled']:.1f} {widths} "
        f"dare_examples_per_s={rates['dare']:.1f} twin_examples_per_s={rates['twin']:.1f}"
    )


if __name__ == "__main__":
    main()
