"""Evolutionary search over per-field embedding dims on a trained OptEmbed supernet.

A candidate is one dim per field in `1..D_f`. Each round evaluates the whole population
with one call of the fitness function (a list of candidates in, one score each out: the
pipeline scores them in parallel, e.g. validation AUC of the supernet masked to each
candidate), ranks it, and breeds the next population from the top: mutations (each field
redrawn with a small probability) and single-point crossovers. The best candidate ever
scored is kept. The paper's defaults: 20 = 10 mutations + 10 crossovers, 30 rounds.

The search is deterministic given its seed and the fitness values, and its whole state is
a plain dict (JSON-compatible), so a checkpoint taken between rounds resumes exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

Candidate = tuple[int, ...]
Fitness = Callable[[list[Candidate]], Sequence[float]]


@dataclass(frozen=True)
class SearchConfig:
    """Population = mutations + crossovers; parents = how many top candidates breed."""

    rounds: int = 30
    mutations: int = 10
    crossovers: int = 10
    parents: int = 10
    mutate_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.parents < 1 or self.mutations + self.crossovers < 1:
            raise ValueError(f"search needs rounds, parents and a population >= 1: {self}")
        if min(self.mutations, self.crossovers) < 0:
            raise ValueError(f"mutations and crossovers must be >= 0: {self}")
        if self.parents > self.mutations + self.crossovers:
            raise ValueError(f"parents ({self.parents}) cannot exceed the population: {self}")
        if not 0.0 <= self.mutate_prob <= 1.0:
            raise ValueError(f"mutate_prob must be in [0, 1]: {self}")


@dataclass(frozen=True)
class RoundStats:
    """One point of the search curve."""

    round: int
    best: float
    mean: float
    best_so_far: float


class EvolutionarySearch:
    """The search loop, one `step` per round; `run` drives it to the end."""

    def __init__(self, field_dims: Sequence[int], config: SearchConfig | None = None) -> None:
        if not field_dims or min(field_dims) < 1:
            raise ValueError(f"field_dims must be >= 1 per field, got {list(field_dims)}")
        self.field_dims = tuple(int(d) for d in field_dims)
        self.config = config or SearchConfig()
        self.rng = np.random.default_rng(self.config.seed)
        self.round = 0
        self.history: list[RoundStats] = []
        self.best: Candidate | None = None
        self.best_fitness = -np.inf
        size = self.config.mutations + self.config.crossovers
        self.population = [self._random() for _ in range(size)]

    @property
    def done(self) -> bool:
        return self.round >= self.config.rounds

    def step(self, fitness: Fitness) -> RoundStats:
        """Score the population, record it, and breed the next one."""
        if self.done:
            raise RuntimeError("the search has run all its rounds")
        scores = [float(s) for s in fitness(list(self.population))]
        if len(scores) != len(self.population):
            raise ValueError(f"fitness returned {len(scores)} scores for {len(self.population)}")
        if any(np.isnan(scores)):
            raise ValueError("fitness returned NaN (e.g. an AUC on one class only)")
        # Stable ranking, best first: ties keep population order, so runs are reproducible.
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        ranked = [self.population[i] for i in order]
        if scores[order[0]] > self.best_fitness:
            self.best, self.best_fitness = ranked[0], scores[order[0]]
        stats = RoundStats(self.round, scores[order[0]], float(np.mean(scores)), self.best_fitness)
        self.history.append(stats)
        self.round += 1
        if not self.done:
            parents = ranked[: self.config.parents]
            self.population = self._mutations(parents) + self._crossovers(parents)
        return stats

    def run(
        self, fitness: Fitness, on_round: Callable[[EvolutionarySearch], None] | None = None
    ) -> tuple[Candidate, float]:
        """Run the remaining rounds; `on_round` (e.g. a checkpoint) is called after each."""
        while not self.done:
            self.step(fitness)
            if on_round is not None:
                on_round(self)
        assert self.best is not None
        return self.best, self.best_fitness

    def _random(self) -> Candidate:
        return tuple(int(self.rng.integers(1, d + 1)) for d in self.field_dims)

    def _mutations(self, parents: list[Candidate]) -> list[Candidate]:
        """Parent i (cycling through the top) with each field redrawn at `mutate_prob`."""
        children = []
        for i in range(self.config.mutations):
            child = list(parents[i % len(parents)])
            redraw = self.rng.random(len(child)) < self.config.mutate_prob
            for f in np.flatnonzero(redraw):
                child[f] = int(self.rng.integers(1, self.field_dims[f] + 1))
            children.append(tuple(child))
        return children

    def _crossovers(self, parents: list[Candidate]) -> list[Candidate]:
        """Head of one parent, tail of another, cut at a random point between fields."""
        children = []
        num_fields = len(self.field_dims)
        for _ in range(self.config.crossovers):
            replace = len(parents) < 2
            a, b = self.rng.choice(len(parents), size=2, replace=replace)
            cut = int(self.rng.integers(1, num_fields)) if num_fields > 1 else 0
            children.append(parents[a][:cut] + parents[b][cut:])
        return children

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain lists, numbers and strings."""
        return {
            "field_dims": list(self.field_dims),
            "config": asdict(self.config),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "round": self.round,
            "population": [list(c) for c in self.population],
            "history": [asdict(h) for h in self.history],
            "best": None if self.best is None else list(self.best),
            "best_fitness": None if self.best is None else self.best_fitness,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> EvolutionarySearch:
        search = cls(state["field_dims"], SearchConfig(**state["config"]))
        search.rng.bit_generator.state = copy.deepcopy(state["rng"])
        search.round = int(state["round"])
        search.population = [tuple(int(d) for d in c) for c in state["population"]]
        search.history = [RoundStats(**h) for h in state["history"]]
        if state["best"] is not None:
            search.best = tuple(int(d) for d in state["best"])
            search.best_fitness = float(state["best_fitness"])
        return search
