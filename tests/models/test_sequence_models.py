"""Stage-1 search against a brute-force reference, DIN's jagged window against a padded
reference, time-gap buckets against hand-computed ones, and the long-sequence models'
contracts."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from models.search import search_top_k
from models.segments import segment_mean
from models.sequence import (
    DIN,
    EmbeddingSet,
    FieldDims,
    SequenceInputs,
    build_sequence_model,
    dare,
    twin,
    twin_with_projections,
)
from models.time_gaps import TIME_GAP_BUCKETS, time_gap_buckets
from recsys.config import SEQUENCE_MODELS
from tables.sequence import reverse_positions


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """These tensors are tiny: extra threads only add synchronisation, which stalls badly
    on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def offsets_of(lengths: list[int]) -> Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)


def brute_top_k(
    target: np.ndarray, history: np.ndarray, lengths: list[int], time_dim: int, k: int
) -> list[list[tuple[int, float]]]:
    """Per user, the k (position, score) pairs with the highest (score, position)."""
    sem = target.shape[1] - time_dim
    start, out = 0, []
    for user, n in enumerate(lengths):
        scored = []
        for pos in range(n):
            h, t = history[start + pos].astype(np.float64), target[user].astype(np.float64)
            score = h[:sem] @ t[:sem] / math.sqrt(sem) + h[sem:] @ t[sem:] / math.sqrt(time_dim)
            scored.append((score, pos))
        out.append([(pos, score) for score, pos in sorted(scored, reverse=True)[:k]])
        start += n
    return out


def check_against_reference(
    target: Tensor, history: Tensor, lengths: list[int], time_dim: int, k: int, exact: bool
) -> None:
    top = search_top_k(target, history, offsets_of(lengths), time_dim, k)
    assert top.indices.shape == top.scores.shape == top.valid.shape == (len(lengths), k)
    reference = brute_top_k(target.numpy(), history.numpy(), lengths, time_dim, k)
    for user, expected in enumerate(reference):
        n = len(expected)
        assert top.valid[user].tolist() == [True] * n + [False] * (k - n)
        assert top.indices[user, :n].tolist() == [pos for pos, _ in expected]
        assert (top.indices[user, n:] == 0).all()
        assert torch.isneginf(top.scores[user, n:]).all()
        scores = torch.tensor([s for _, s in expected], dtype=torch.float32)
        if exact:
            assert torch.equal(top.scores[user, :n], scores)
        else:
            torch.testing.assert_close(top.scores[user, :n], scores)


def test_search_matches_brute_force_with_ties_and_short_histories() -> None:
    # Small integer embeddings with d_sem = d_time = 4 make every score exact (scales 1/2)
    # and full of ties, including ties across the K-th place.
    gen = torch.Generator().manual_seed(0)
    lengths = [0, 1, 7, 20, 21, 64, 300]
    target = torch.randint(-1, 2, (len(lengths), 8), generator=gen).float()
    history = torch.randint(-1, 2, (sum(lengths), 8), generator=gen).float()
    check_against_reference(target, history, lengths, time_dim=4, k=20, exact=True)
    kept = brute_top_k(target.numpy(), history.numpy(), lengths, time_dim=4, k=21)
    scores = [score for user in kept for _, score in user]
    assert len(set(scores)) < len(scores) / 4  # the data really is tie-heavy


@pytest.mark.parametrize(("sem", "time_dim", "k"), [(16, 8, 20), (48, 16, 5), (4, 2, 1)])
def test_search_matches_brute_force_random(sem: int, time_dim: int, k: int) -> None:
    gen = torch.Generator().manual_seed(sem + k)
    lengths = torch.randint(0, 400, (13,), generator=gen).tolist()
    target = torch.randn(len(lengths), sem + time_dim, generator=gen)
    history = torch.randn(sum(lengths), sem + time_dim, generator=gen)
    check_against_reference(target, history, lengths, time_dim, k, exact=False)


def test_search_without_time_part() -> None:
    """time_dim = 0 scores <t, h> / sqrt(d): as with an all-zero time column."""
    lengths = [30, 2, 17]
    target, history = torch.randn(3, 6), torch.randn(sum(lengths), 6)
    top = search_top_k(target, history, offsets_of(lengths), 0, 5)
    zero_time = search_top_k(
        nn.functional.pad(target, (0, 1)),
        nn.functional.pad(history, (0, 1)),
        offsets_of(lengths),
        1,
        5,
    )
    assert torch.equal(top.indices, zero_time.indices)
    torch.testing.assert_close(top.scores, zero_time.scores)


def test_search_bound_for_export() -> None:
    lengths = [5, 40, 0, 33]
    target, history = torch.randn(4, 12), torch.randn(sum(lengths), 12)
    free = search_top_k(target, history, offsets_of(lengths), 4, 8)
    bounded = search_top_k(target, history, offsets_of(lengths), 4, 8, max_length=100)
    assert torch.equal(free.indices, bounded.indices)
    with pytest.raises(RuntimeError):
        search_top_k(target, history, offsets_of(lengths), 4, 8, max_length=39)


def test_reverse_positions_and_segment_mean() -> None:
    offsets = offsets_of([3, 0, 2])
    assert reverse_positions(offsets).tolist() == [3, 2, 1, 2, 1]
    values = torch.arange(10.0).view(5, 2)
    assert segment_mean(values, offsets).tolist() == [[2.0, 3.0], [0.0, 0.0], [7.0, 8.0]]


# --------------------------------------------------------------------------- models

DIMS = FieldDims(item=8, category=4, time=4)
NARROW = FieldDims(item=4, category=2, time=2)
ITEMS, CATEGORIES, LONGEST = 300, 12, 120


class Tables(nn.Module):
    """Plain tables for the tests: item, category and time-position embeddings of one set."""

    def __init__(self, dims: FieldDims) -> None:
        super().__init__()
        self.item = nn.Embedding(ITEMS, dims.item)
        self.category = nn.Embedding(CATEGORIES, dims.category)
        self.time = nn.Embedding(LONGEST + 1, dims.time)

    def forward(self, target: Tensor, history: Tensor, offsets: Tensor) -> EmbeddingSet:
        def vectors(items: Tensor, times: Tensor) -> Tensor:
            fields = [self.item(items), self.category(items % CATEGORIES), self.time(times)]
            return torch.cat(fields, dim=1)

        return EmbeddingSet(
            vectors(target, torch.zeros_like(target)),
            vectors(history, reverse_positions(offsets)),
        )


def planted_batch(batch: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(targets, history items, offsets, labels): a click when the target's category is
    frequent in the history, so the label needs the attention to find the right behaviours."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, LONGEST, (batch,), generator=gen)
    favourite = torch.randint(0, CATEGORIES, (batch,), generator=gen)
    history = torch.randint(0, ITEMS, (int(lengths.sum()),), generator=gen)
    user = torch.repeat_interleave(torch.arange(batch), lengths)
    liked = torch.rand(len(history), generator=gen) < 0.5
    history = torch.where(liked, history - history % CATEGORIES + favourite[user], history)
    history = history.clamp(max=ITEMS - 1)
    targets = torch.randint(0, ITEMS, (batch,), generator=gen)
    same = (history % CATEGORIES == (targets % CATEGORIES)[user]).float()
    share = torch.zeros(batch).index_add(0, user, same) / lengths
    return targets, history, offsets_of(lengths.tolist()), (share > 0.2).float()


def random_gaps(n: int, seed: int) -> Tensor:
    """[N] gaps in seconds spread over the log2 buckets, a few of them <= 0."""
    gen = torch.Generator().manual_seed(seed)
    return (2.0 ** (torch.rand(n, generator=gen) * 32)).long() - 3


def inputs_for(
    model: nn.Module,
    tables: dict[str, Tables],
    targets: Tensor,
    history: Tensor,
    offsets: Tensor,
    gaps: Tensor | None = None,
) -> SequenceInputs:
    rep = tables["representation"](targets, history, offsets)
    if not model.decoupled:
        return SequenceInputs.coupled(rep, offsets, gaps=gaps)
    return SequenceInputs(tables["attention"](targets, history, offsets), rep, offsets, gaps=gaps)


def make(name: str, seed: int = 0, time_gaps: bool = False) -> tuple[nn.Module, dict[str, Tables]]:
    torch.manual_seed(seed)
    narrow = {"attention_dims": NARROW} if name == "dare" else {}
    model = build_sequence_model(
        name, DIMS, top_k=10, din_length=30, max_length=LONGEST, time_gaps=time_gaps, **narrow
    )
    tables = {"representation": Tables(DIMS)}
    if model.decoupled:
        tables["attention"] = Tables(NARROW)
    return model, tables


def test_the_named_builders_are_what_the_config_names_build() -> None:
    named = {
        "twin": twin(DIMS, top_k=10),
        "twin_proj": twin_with_projections(DIMS, top_k=10),
        "dare": dare(NARROW, DIMS, top_k=10),
    }
    for name, model in named.items():
        attention = NARROW if name == "dare" else None
        built = build_sequence_model(name, DIMS, attention_dims=attention, top_k=10)
        assert (built.decoupled, built.attention_dims, built.top_k) == (
            model.decoupled,
            model.attention_dims,
            model.top_k,
        )
        shapes = {k: v.shape for k, v in built.state_dict().items()}
        assert shapes == {k: v.shape for k, v in model.state_dict().items()}, name
    assert named["dare"].decoupled and named["twin_proj"].projections is not None


def test_dare_with_tied_sets_is_twin() -> None:
    twin = build_sequence_model("twin", DIMS, top_k=10)
    dare = build_sequence_model("dare", DIMS, top_k=10)
    assert dare.decoupled and not twin.decoupled
    dare.load_state_dict(twin.state_dict())
    tables = Tables(DIMS)
    targets, history, offsets, _ = planted_batch(32, seed=1)
    tied = tables(targets, history, offsets)
    for mode in (True, False):
        twin.train(mode)
        dare.train(mode)
        a = twin(SequenceInputs.coupled(tied, offsets))
        b = dare(SequenceInputs(tied, tied, offsets))
        assert torch.equal(a, b)


def test_builder_rejects_a_second_set_for_coupled_models() -> None:
    for name in ("din", "twin", "twin_proj"):
        with pytest.raises(ValueError, match="dare"):
            build_sequence_model(name, DIMS, attention_dims=NARROW)


def test_identity_projections_are_twin() -> None:
    twin = build_sequence_model("twin", DIMS, top_k=10).eval()
    proj = build_sequence_model("twin_proj", DIMS, top_k=10).eval()
    proj.load_state_dict(twin.state_dict(), strict=False)
    with torch.no_grad():
        for p in proj.projections.parameters():
            p.copy_(torch.eye(p.shape[0]))
    targets, history, offsets, _ = planted_batch(32, seed=2)
    inputs = SequenceInputs.coupled(Tables(DIMS)(targets, history, offsets), offsets)
    torch.testing.assert_close(proj(inputs), twin(inputs))


def test_dare_gradients_reach_both_sets() -> None:
    model, _ = make("dare")
    _, history, offsets, _ = planted_batch(16, seed=3)

    def leaf(dims: FieldDims) -> EmbeddingSet:
        n = len(history)
        return EmbeddingSet(
            torch.randn(16, dims.total, requires_grad=True),
            torch.randn(n, dims.total, requires_grad=True),
        )

    leaves = {"attention": leaf(NARROW), "representation": leaf(DIMS)}
    logits = model(SequenceInputs(leaves["attention"], leaves["representation"], offsets))
    assert logits.shape == (16,)
    logits.sum().backward()
    for s in leaves.values():
        assert s.target.grad.abs().sum() > 0 and s.history.grad.abs().sum() > 0
    # Attention gradients reach only the behaviours the search kept.
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    selected = sum(min(n, 10) for n in lengths)
    assert int((leaves["attention"].history.grad.abs().sum(1) > 0).sum()) == selected


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_other_features_reach_the_head(name: str) -> None:
    model = build_sequence_model(name, DIMS, other_dim=3, top_k=10, din_length=30)
    targets, history, offsets, _ = planted_batch(8, seed=7)
    other = torch.randn(8, 3, requires_grad=True)
    inputs = SequenceInputs.coupled(Tables(DIMS)(targets, history, offsets), offsets, other)
    model(inputs).sum().backward()
    assert other.grad.abs().sum() > 0


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_training_lowers_the_loss(name: str) -> None:
    model, tables = make(name)
    params = [*model.parameters(), *(p for t in tables.values() for p in t.parameters())]
    optimizer = torch.optim.Adam(params, lr=0.01)
    targets, history, offsets, labels = planted_batch(128, seed=4)
    losses = []
    for _ in range(20):
        logits = model(inputs_for(model, tables, targets, history, offsets))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("time_gaps", [False, True])
@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_export_round_trip(name: str, time_gaps: bool) -> None:
    model, tables = make(name, time_gaps=time_gaps)
    if time_gaps:
        nn.init.normal_(model.time_gaps.table.weight)
    model.eval()

    def batch(size: int, seed: int) -> SequenceInputs:
        targets, history, offsets, _ = planted_batch(size, seed)
        gaps = random_gaps(len(history), seed) if time_gaps else None
        return inputs_for(model, tables, targets, history, offsets, gaps)

    with torch.no_grad():
        example = batch(8, seed=5)
        size, total = torch.export.Dim("batch"), torch.export.Dim("total")
        per_set = [{0: size}, {0: total}]  # EmbeddingSet: target, history
        # SequenceInputs' fields that are not None: attention, representation, offsets[, gaps]
        shapes = [per_set, per_set, {0: size + 1}, *([{0: total}] if time_gaps else [])]
        exported = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
        fresh = batch(21, seed=6)
        torch.testing.assert_close(exported.module()(fresh), model(fresh))


# --------------------------------------------------------------------------- DIN's window


def padded_din(model: DIN, inputs: SequenceInputs, gaps: list[int] | None) -> Tensor:
    """DIN written the padded way, row by row: each user's last `length` behaviours in a
    [B, length] window, padding masked out of the softmax and the mean."""
    att, rep, length = inputs.attention, inputs.representation, model.length
    bounds = inputs.offsets.tolist()
    batch, width = len(bounds) - 1, att.target.shape[1]
    keys = att.target.new_zeros(batch, length, width)
    values = rep.target.new_zeros(batch, length, rep.target.shape[1])
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for user in range(batch):
        kept = list(range(max(bounds[user], bounds[user + 1] - length), bounds[user + 1]))
        for slot, row in enumerate(kept):
            key = att.history[row]
            if gaps is not None:
                bucket = 0 if gaps[row] <= 0 else min(gaps[row].bit_length(), TIME_GAP_BUCKETS - 1)
                key = key + model.time_gaps.table.weight[bucket]
            keys[user, slot], values[user, slot] = key, rep.history[row]
            valid[user, slot] = True
    target = att.target.unsqueeze(1).expand_as(keys)
    scores = model.unit(torch.cat([target, keys, target - keys, target * keys], -1)).squeeze(-1)
    weights = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=1)
    weights = torch.where(valid, weights, 0.0)  # an empty window: NaN rows -> 0
    interest = (weights.unsqueeze(-1) * values).sum(1)
    mean = (values * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    return model.head(rep.target, interest, mean, inputs.other)


@pytest.mark.parametrize("time_gaps", [False, True])
def test_din_window_equals_the_padded_formulation(time_gaps: bool) -> None:
    """Mixed lengths: empty, shorter than, equal to and longer than the window (whose most
    recent `length` behaviours, the last ones, are kept); logits and every gradient."""
    torch.manual_seed(0)
    model = build_sequence_model("din", DIMS, din_length=30, other_dim=2, time_gaps=time_gaps)
    if time_gaps:
        nn.init.normal_(model.time_gaps.table.weight)
    lengths = [0, 1, 7, 29, 30, 31, 0, 95, 3]
    offsets = offsets_of(lengths)
    gen = torch.Generator().manual_seed(1)
    leaves = [
        torch.randn(len(lengths), DIMS.total, generator=gen),
        torch.randn(sum(lengths), DIMS.total, generator=gen),
        torch.randn(len(lengths), 2, generator=gen),
    ]
    gaps = random_gaps(sum(lengths), seed=2) if time_gaps else None
    results = []
    for jagged in (True, False):
        target, history, other = (x.clone().requires_grad_() for x in leaves)
        inputs = SequenceInputs.coupled(EmbeddingSet(target, history), offsets, other, gaps)
        model.zero_grad()
        logits = (
            model(inputs)
            if jagged
            else padded_din(model, inputs, None if gaps is None else gaps.tolist())
        )
        (logits * torch.arange(1.0, len(lengths) + 1)).sum().backward()
        grads = [target.grad, history.grad, other.grad]
        results.append([logits.detach(), *grads, *(p.grad.clone() for p in model.parameters())])
    for jagged, padded in zip(*results, strict=True):
        torch.testing.assert_close(jagged, padded, rtol=1e-5, atol=1e-6)
    # Behaviours before a user's window get no gradient; those inside do.
    ends = offsets[1:].tolist()
    window = [
        row for end, n in zip(ends, lengths, strict=True) for row in range(end - min(n, 30), end)
    ]
    touched = results[0][2].abs().sum(1) > 0
    assert touched.nonzero().squeeze(1).tolist() == window


# --------------------------------------------------------------------------- time gaps


def test_time_gap_buckets_are_log2_with_nonpositive_gaps_in_bucket_0() -> None:
    gaps = [-(2**40), -5, 0, 1, 2, 3, 4, 7, 8, 1023, 1024, 86_400, 2**30 - 1, 2**30, 2**62]
    expected = [0, 0, 0, 1, 2, 2, 3, 3, 4, 10, 11, 17, 30, 31, 31]
    assert time_gap_buckets(torch.tensor(gaps)).tolist() == expected
    assert time_gap_buckets(torch.tensor([5, 6, 100]), buckets=4).tolist() == [3, 3, 3]


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_scores_move_with_the_gaps_alone(name: str) -> None:
    """Same behaviours, other gaps: other scores; gaps in the same buckets: the same ones."""
    model, tables = make(name, time_gaps=True)
    nn.init.normal_(model.time_gaps.table.weight)
    model.eval()
    targets, history, offsets, _ = planted_batch(16, seed=8)
    gaps = random_gaps(len(history), seed=9)
    same_buckets = torch.where(gaps > 1, gaps + (2 ** time_gap_buckets(gaps) - 1 - gaps) // 2, gaps)
    assert torch.equal(time_gap_buckets(same_buckets), time_gap_buckets(gaps))
    with torch.no_grad():
        scores = [
            model(inputs_for(model, tables, targets, history, offsets, g))
            for g in (gaps, same_buckets, gaps.roll(1))
        ]
    assert torch.equal(scores[0], scores[1])
    assert (scores[0] - scores[2]).abs().min() > 0


@pytest.mark.parametrize("name", SEQUENCE_MODELS)
def test_without_timestamps_the_models_are_unchanged(name: str) -> None:
    """No gaps, no gap parameters; and a fresh gap table (zeros) scores bitwise like none."""
    plain, tables = make(name)
    assert not any("time_gaps" in key for key in plain.state_dict())
    with_gaps, _ = make(name, time_gaps=True)
    with_gaps.load_state_dict(plain.state_dict(), strict=False)
    targets, history, offsets, _ = planted_batch(16, seed=10)
    gaps = random_gaps(len(history), seed=11)
    for mode in (False, True):  # eval first: training steps the BatchNorm statistics
        plain.train(mode)
        with_gaps.train(mode)
        reference = plain(inputs_for(plain, tables, targets, history, offsets))
        ignored = plain(inputs_for(plain, tables, targets, history, offsets, gaps))
        zero = with_gaps(inputs_for(with_gaps, tables, targets, history, offsets, gaps))
        assert torch.equal(reference, ignored) and torch.equal(reference, zero)
    with pytest.raises(ValueError, match="gaps"):
        with_gaps(inputs_for(with_gaps, tables, targets, history, offsets))
