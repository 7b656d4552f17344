"""OptEmbed core: row masks and thresholds, dimension masks, masked pooling, the search.

Masks are checked on hand-made rows against the paper's formulas; `OptEmbedPooling` is
checked against a per-row reference written with plain autograd, and end to end behind
torchrec collections (unsharded, CPU).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
    JaggedTensor,
    KeyedJaggedTensor,
    KeyedTensor,
)

from tables.optembed import fused as optembed_fused
from tables.optembed.masks import (
    FieldThresholds,
    Mode,
    kept_rows,
    prefix_masks,
    row_mask,
    sample_dims,
    sparsity,
    step_surrogate_grad,
)
from tables.optembed.pooling import OptEmbedPooling, bag_rows, one_bag_per_id, single_rows
from tables.optembed.search import EvolutionarySearch, SearchConfig

# --------------------------------------------------------------------------- row masks


def test_step_forward_and_estimator_gradient_match_the_paper() -> None:
    x = torch.tensor([-1.5, -1.0, -0.7, -0.4, -0.1, 0.0, 0.2, 0.4, 0.5, 1.0, 1.05, 1.2])
    # g = 2 - 4|x| for |x| <= 0.4, 0.4 for 0.4 < |x| <= 1, 0 beyond.
    g = [0.0, 0.4, 0.4, 0.4, 1.6, 2.0, 1.2, 0.4, 0.4, 0.4, 0.0, 0.0]
    leaf = x.clone().requires_grad_()
    mask = row_mask(leaf)
    assert mask.tolist() == [0.0] * 6 + [1.0] * 6  # 1 where x > 0; x = 0 is pruned
    mask.backward(torch.full_like(x, 3.0))
    torch.testing.assert_close(leaf.grad, 3.0 * torch.tensor(g))
    torch.testing.assert_close(step_surrogate_grad(x), torch.tensor(g))


def test_kept_rows_on_a_hand_made_table() -> None:
    weight = torch.tensor(
        [
            [0.25, -0.25, 0.0],  # L1 0.5: below
            [0.5, 0.0, -0.5],  # L1 1.0: at the threshold, pruned (step(0) = 0)
            [1.0, -1.0, 0.5],  # L1 2.5: above
            [0.0, 0.0, 0.0],
        ]
    )
    assert kept_rows(weight, 1.0).tolist() == [False, False, True, False]
    assert kept_rows(weight, 0.0).tolist() == [True, True, True, False]
    assert kept_rows(weight, 1.0, chunk_rows=3).tolist() == [False, False, True, False]
    # L2 norms 0.354, 0.707, 1.5
    assert kept_rows(weight, 0.6, norm=2).tolist() == [False, True, True, False]


def test_regularizer_pushes_thresholds_up() -> None:
    thresholds = FieldThresholds(3)
    assert thresholds.threshold.tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        thresholds.threshold[2] = 1.0
    reg = thresholds.regularizer(alpha=0.1)
    torch.testing.assert_close(reg, 0.1 * (2 + torch.exp(torch.tensor(-1.0))))
    reg.backward()
    grad = thresholds.threshold.grad
    assert grad is not None and bool((grad < 0).all())  # descent raises every threshold
    torch.testing.assert_close(grad, -0.1 * torch.exp(-thresholds.threshold.detach()))


@pytest.mark.parametrize("lengths", [[1], [2]], ids=["single-row block", "jagged"])
def test_threshold_and_row_gradients_follow_the_estimator(lengths: list[int]) -> None:
    """One row e (a second, zero row for the jagged case), L1 norm n = 0.9, threshold 0.6:
    out = m e with m = step(n - t) = 1, loss = <g, out>.
    d loss / d t = -<g, e> g(n - t); d loss / d e = m g + <g, e> g(n - t) sign(e)."""
    e = torch.tensor([0.5, -0.3, 0.1, 0.0])
    values = torch.stack([e, torch.zeros(4)])[: sum(lengths)].clone().requires_grad_()
    pooling = OptEmbedPooling(["f"], [0], [4])
    with torch.no_grad():
        pooling.thresholds.threshold[0] = 0.6
    pooling.use_search([4])
    rows = {"f": JaggedTensor(values=values, lengths=torch.tensor(lengths))}
    g = torch.tensor([1.0, 2.0, -1.0, 0.5])
    out = pooling(rows).values()
    torch.testing.assert_close(out, e.unsqueeze(0))
    (out * g).sum().backward()

    surrogate = 2 - 4 * 0.3  # g(x) at x = 0.9 - 0.6
    dot = float(g @ e)
    grad_t = pooling.thresholds.threshold.grad
    assert grad_t is not None
    torch.testing.assert_close(grad_t, torch.tensor([-dot * surrogate]))
    assert values.grad is not None
    torch.testing.assert_close(values.grad[0], g + dot * surrogate * torch.sign(e))


# --------------------------------------------------------------------------- dim masks


def test_prefix_masks_keep_the_first_d_columns() -> None:
    table = prefix_masks(5)
    for d in range(1, 6):
        assert table[d - 1].tolist() == [1.0] * d + [0.0] * (5 - d)


def test_sampled_dims_are_uniform_per_field() -> None:
    field_dims = torch.tensor([4, 16])
    n = 64_000
    dims = sample_dims(n, field_dims, torch.Generator().manual_seed(0))
    assert dims.shape == (n, 2)
    for f, width in enumerate(field_dims.tolist()):
        counts = torch.bincount(dims[:, f], minlength=width + 1)
        assert counts[0] == 0 and counts.sum() == n  # all in 1..D
        expected = n / width
        # each count is Binomial(n, 1/D): 5 standard deviations
        tolerance = 5 * (n * (1 / width) * (1 - 1 / width)) ** 0.5
        assert (counts[1:].float() - expected).abs().max() < tolerance
    # the two fields draw independently: the joint table is near uniform too
    joint = torch.bincount((dims[:, 0] - 1) * 16 + dims[:, 1] - 1, minlength=64)
    assert joint.min() > 0.7 * n / 64 and joint.max() < 1.3 * n / 64


def test_supernet_masks_columns_per_sample_with_a_prefix() -> None:
    batch, width = 200, 8
    pooling = OptEmbedPooling(["f"], [0], [width])
    pooling.use_supernet(torch.Generator().manual_seed(3))
    values = torch.rand(batch, width) + 0.1  # every entry nonzero, every row kept
    out = pooling({"f": JaggedTensor(values=values, lengths=torch.ones(batch, dtype=torch.long))})
    kept = (out.values() != 0).sum(1)
    expected = sample_dims(batch, torch.tensor([width]), torch.Generator().manual_seed(3))[:, 0]
    assert kept.tolist() == expected.tolist()
    prefix = prefix_masks(width)[kept - 1]
    torch.testing.assert_close(out.values(), values * prefix)


# --------------------------------------------------------------------------- pooling


def _hand_rows() -> dict[str, JaggedTensor]:
    a = torch.tensor(
        [[1.0, -1.0, 0.5, 0.0], [0.1, 0.1, 0.1, 0.1], [2.0, 0.0, 0.0, -2.0]]
    )  # L1 2.5, 0.4, 4.0
    b = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.2, -0.2, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    return {
        "a": JaggedTensor(values=a, lengths=torch.tensor([1, 1, 1])),
        "b": JaggedTensor(values=b, lengths=torch.tensor([2, 0, 1])),  # L1 4.0, 0.4 | - | 3.0
    }


@pytest.mark.parametrize("mean", [False, True])
def test_pooling_equals_a_hand_computation(mean: bool) -> None:
    pooling = OptEmbedPooling(["a", "b"], [0, 1], [4, 4], mean_features=["b"] if mean else [])
    with torch.no_grad():
        pooling.thresholds.threshold.fill_(0.5)  # prunes the two rows of L1 norm 0.4
    pooling.use_search([3, 2])
    out = pooling(_hand_rows())
    assert out.keys() == ["a", "b"] and out.length_per_key() == [4, 4]
    a_expected = [[1.0, -1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]]
    # sample 0 of b: the kept row plus the pruned one (zeros); mean divides by both
    b0 = [0.5, 0.5, 0.0, 0.0] if mean else [1.0, 1.0, 0.0, 0.0]
    b_expected = [b0, [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]
    torch.testing.assert_close(out["a"], torch.tensor(a_expected))
    torch.testing.assert_close(out["b"], torch.tensor(b_expected))


def _reference(
    rows: dict[str, JaggedTensor],
    features: list[str],
    fields: list[int],
    threshold: Tensor,
    dims: Tensor,
    mean: set[str],
) -> Tensor:
    """Row by row with `row_mask` and plain autograd: `dims` is [B, fields]."""
    out = []
    for feature, field in zip(features, fields, strict=True):
        jt = rows[feature]
        width = jt.values().size(1)
        samples = []
        for b, part in enumerate(jt.values().split(jt.lengths().tolist())):
            pooled = torch.zeros(width)
            for row in part:
                pooled = pooled + row_mask(row.abs().sum() - threshold[field]) * row
            if feature in mean:
                pooled = pooled / max(len(part), 1)
            samples.append(pooled * (torch.arange(width) < dims[b, field]))
        out.append(torch.stack(samples))
    return torch.cat(out, dim=1)


def test_pooling_values_and_gradients_match_the_per_row_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, features, fields = 6, ["s1", "m", "s2", "n"], [0, 1, 0, 2]
    field_dims = [8, 8, 4]
    lengths = {
        "s1": [1] * batch,
        "m": [2, 0, 3, 1, 1, 4],
        "s2": [1] * batch,
        "n": [1, 1, 0, 1, 1, 1],  # single-valued with a missing value: the jagged path
    }
    width = {f: field_dims[field] for f, field in zip(features, fields, strict=True)}
    leaves = {
        f: (torch.rand(sum(lengths[f]), width[f], generator=gen) - 0.5).requires_grad_()
        for f in features
    }
    rows = {f: JaggedTensor(values=leaves[f], lengths=torch.tensor(lengths[f])) for f in features}
    pooling = OptEmbedPooling(features, fields, field_dims, mean_features=["m"])
    with torch.no_grad():
        pooling.thresholds.threshold.copy_(torch.tensor([1.0, 1.5, 0.6]))
    pooling.use_supernet(torch.Generator().manual_seed(7))
    out = pooling(rows).values()
    probe = torch.randn(out.shape, generator=gen)
    (out * probe).sum().backward()
    got = {f: leaves[f].grad.clone() for f in features}  # type: ignore[union-attr]
    got_t = pooling.thresholds.threshold.grad.clone()  # type: ignore[union-attr]

    threshold = pooling.thresholds.threshold.detach().clone().requires_grad_()
    for leaf in leaves.values():
        leaf.grad = None
    dims = sample_dims(batch, torch.tensor(field_dims), torch.Generator().manual_seed(7))
    expected = _reference(rows, features, fields, threshold, dims, {"m"})
    torch.testing.assert_close(out, expected)
    assert 0 < int((out == 0).sum()) < out.numel()  # some rows and columns were masked
    (expected * probe).sum().backward()
    for f in features:
        torch.testing.assert_close(got[f], leaves[f].grad)
    torch.testing.assert_close(got_t, threshold.grad)


def _fused_against_pooling(monkeypatch: pytest.MonkeyPatch | None) -> None:
    """`optembed_fused.masked_block` (compiled, or its functions run as they are when
    `monkeypatch` swaps the compiler out) against `OptEmbedPooling`'s eager single block:
    values, row gradients and threshold gradients, supernet dims, some rows pruned."""
    if monkeypatch is not None:
        monkeypatch.setattr(optembed_fused, "_compiled", lambda fn: fn)
    gen = torch.Generator().manual_seed(3)
    batch, features, width = 64, ["a", "b", "c"], 8
    x = (torch.rand(batch, len(features), width, generator=gen) - 0.5).requires_grad_()
    pooling = OptEmbedPooling(features, [0, 1, 2], [width] * 3)
    with torch.no_grad():
        pooling.thresholds.threshold.copy_(torch.tensor([1.5, 2.0, 1.0]))
    pooling.use_supernet(torch.Generator().manual_seed(4))
    single = KeyedTensor(keys=features, length_per_key=[width] * 3, values=x.flatten(1))
    expected = pooling({}, single=single).values()  # small: the eager path
    probe = torch.randn(expected.shape, generator=gen)
    (expected * probe).sum().backward()
    grad_x, grad_t = x.grad.clone(), pooling.thresholds.threshold.grad.clone()  # type: ignore[union-attr]
    assert 0 < int((expected == 0).sum()) < expected.numel()

    x.grad, pooling.thresholds.threshold.grad = None, None
    dims = sample_dims(batch, torch.tensor([width] * 3), torch.Generator().manual_seed(4))
    got = optembed_fused.masked_block(x, pooling.thresholds.threshold, dims)
    torch.testing.assert_close(got.flatten(1), expected)
    (got.flatten(1) * probe).sum().backward()
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(pooling.thresholds.threshold.grad, grad_t)


def test_fused_block_math_matches_the_eager_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    _fused_against_pooling(monkeypatch)


def test_compiled_fused_block_matches_the_eager_masks() -> None:
    """The Inductor-compiled kernels (a first compile takes about 15 s)."""
    _fused_against_pooling(None)


def test_fused_block_serves_only_large_supernet_blocks_with_gradients() -> None:
    x = torch.zeros(1024, 8, 8, requires_grad=True)  # MIN_ELEMENTS = 65536 elements
    dims = torch.ones(1024, 8, dtype=torch.long)
    assert optembed_fused.usable(x, dims)
    assert not optembed_fused.usable(x[:512], dims[:512])  # too small to pay for compiling
    assert not optembed_fused.usable(x, dims[:1])  # one dim per field: search mode
    assert not optembed_fused.usable(x.detach(), dims)
    with torch.no_grad():
        assert not optembed_fused.usable(x, dims)


def test_modes_validate_their_configuration() -> None:
    pooling = OptEmbedPooling(["a", "b"], [0, 1], [4, 4])
    with pytest.raises(ValueError, match=r"one dim in 1\.\.D_f"):
        pooling.use_search([5, 1])
    with pytest.raises(ValueError, match=r"one dim in 1\.\.D_f"):
        pooling.use_search([1])
    with pytest.raises(ValueError, match="keep mask"):
        pooling.use_retrain([4, 4], {"a": torch.ones(3, dtype=torch.bool)})
    pooling.use_retrain([4, 4], {f: torch.ones(3, dtype=torch.bool) for f in ("a", "b")})
    assert pooling.mode is Mode.RETRAIN
    with pytest.raises(ValueError, match="need_indices"):
        pooling(_hand_rows())
    with pytest.raises(ValueError, match="field's dim"):
        OptEmbedPooling(["a", "b"], [0, 1], [4, 8])(_hand_rows())


# --------------------------------------------------------------------------- torchrec


TABLE_ROWS, DIM = 20, 8
FEATURES = ["user", "item", "tags"]  # "tags" is multi-valued and shares item's table


def _kjt() -> KeyedJaggedTensor:
    lengths = {"user": [1, 1, 1, 1], "item": [1, 1, 1, 1], "tags": [3, 0, 2, 1]}
    values = {
        "user": [3, 7, 3, 19],
        "item": [0, 5, 11, 5],
        "tags": [5, 6, 7, 11, 2, 9],
    }
    return KeyedJaggedTensor(
        keys=FEATURES,
        values=torch.tensor([v for f in FEATURES for v in values[f]]),
        lengths=torch.tensor([n for f in FEATURES for n in lengths[f]]),
    )


def _weights() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    weights = {t: torch.rand(TABLE_ROWS, DIM, generator=gen) - 0.5 for t in ("t_user", "t_item")}
    for w in weights.values():
        w[::3] *= 0.1  # every third row gets a small norm: pruned at the thresholds below
    return weights


def _collection(need_indices: bool = False) -> EmbeddingCollection:
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name="t_user", embedding_dim=DIM, num_embeddings=TABLE_ROWS, feature_names=["user"]
            ),
            EmbeddingConfig(
                name="t_item",
                embedding_dim=DIM,
                num_embeddings=TABLE_ROWS,
                feature_names=["item", "tags"],
            ),
        ],
        need_indices=need_indices,
    )
    with torch.no_grad():
        for name, w in _weights().items():
            ec.embeddings[name].weight.copy_(w)
    return ec


def _pooling() -> OptEmbedPooling:
    pooling = OptEmbedPooling(FEATURES, [0, 1, 2], [DIM] * 3, mean_features=["tags"])
    with torch.no_grad():
        pooling.thresholds.threshold.copy_(torch.tensor([1.0, 1.0, 1.2]))
    return pooling


def test_embedding_collection_feeds_the_pooling_end_to_end() -> None:
    ec, pooling = _collection(), _pooling()
    pooling.use_search([5, 8, 3])
    kjt = _kjt()
    out = pooling(ec(kjt))

    weights = _weights()
    table = {"user": "t_user", "item": "t_item", "tags": "t_item"}
    dims = torch.tensor([[5, 8, 3]] * 4)
    rows = {
        f: JaggedTensor(values=weights[table[f]][jt.values()], lengths=jt.lengths())
        for f, jt in kjt.to_dict().items()
    }
    threshold = pooling.thresholds.threshold.detach()
    expected = _reference(rows, FEATURES, [0, 1, 2], threshold, dims, {"tags"})
    torch.testing.assert_close(out.values(), expected)
    assert out.values().shape == (4, 3 * DIM)

    pooling.use_supernet(torch.Generator().manual_seed(0))
    loss = pooling(ec(kjt)).values().square().sum() + pooling.thresholds.regularizer(1e-3)
    loss.backward()
    for name in ("t_user", "t_item"):
        assert ec.embeddings[name].weight.grad is not None
    assert pooling.thresholds.threshold.grad is not None


def test_retrain_with_kept_rows_scores_what_search_scores() -> None:
    """Fixed masks from `kept_rows` on the same weights reproduce the norm-based masks."""
    ec, pooling = _collection(need_indices=True), _pooling()
    dims = [3, 8, 6]
    pooling.use_search(dims)
    kjt = _kjt()
    searched = pooling(ec(kjt)).values()
    weights = _weights()
    threshold = pooling.thresholds.threshold.detach()
    keep = {
        "user": kept_rows(weights["t_user"], threshold[0]),
        "item": kept_rows(weights["t_item"], threshold[1]),
        "tags": kept_rows(weights["t_item"], threshold[2]),
    }
    assert 0 < sum(int(k.sum()) for k in keep.values()) < 3 * TABLE_ROWS
    pooling.use_retrain(dims, keep)
    torch.testing.assert_close(pooling(ec(kjt)).values(), searched)


def test_pooled_lookups_with_one_id_per_bag_give_the_same_rows_and_gradients() -> None:
    """`single_rows` / `one_bag_per_id` + `bag_rows` behind `EmbeddingBagCollection`s
    reproduce the `EmbeddingCollection` path, forward and backward."""
    weights = _weights()

    def bags(name: str, features: list[str]) -> EmbeddingBagCollection:
        ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name, embedding_dim=DIM, num_embeddings=TABLE_ROWS, feature_names=features
                )
            ]
        )
        with torch.no_grad():
            ebc.embedding_bags[name].weight.copy_(weights[name])
        return ebc

    kjt = _kjt()
    ec, pooling = _collection(), _pooling()
    pooling.use_supernet(torch.Generator().manual_seed(5))
    expected = pooling(ec(kjt)).values()
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(6))
    (expected * probe).sum().backward()

    user = KeyedJaggedTensor.from_jt_dict({"user": kjt["user"]})
    items = KeyedJaggedTensor.from_jt_dict({"item": kjt["item"], "tags": kjt["tags"]})
    bagged = one_bag_per_id(items)
    assert bagged.stride() == 6 and bagged.lengths().sum() == items.values().numel()
    for as_block in (False, True):  # user's rows via `single_rows`, or as `single=`
        user_bags, item_bags = bags("t_user", ["user"]), bags("t_item", ["item", "tags"])
        rows = bag_rows(item_bags(bagged), items)
        pooling.use_supernet(torch.Generator().manual_seed(5))
        if as_block:
            got = pooling(rows, single=user_bags(user)).values()
        else:
            rows.update(single_rows(user_bags(user), user))
            got = pooling(rows).values()
        torch.testing.assert_close(got, expected)
        (got * probe).sum().backward()
        torch.testing.assert_close(
            user_bags.embedding_bags["t_user"].weight.grad, ec.embeddings["t_user"].weight.grad
        )
        torch.testing.assert_close(
            item_bags.embedding_bags["t_item"].weight.grad, ec.embeddings["t_item"].weight.grad
        )


def test_single_block_keeps_feature_order_and_checks_its_input() -> None:
    """A `single=` block whose features are not adjacent in the output order, next to rows."""
    gen = torch.Generator().manual_seed(2)
    features = ["s1", "m", "s2"]
    pooling = OptEmbedPooling(features, [0, 1, 2], [4, 4, 4])
    with torch.no_grad():
        pooling.thresholds.threshold.fill_(0.8)
    pooling.use_search([2, 4, 3])
    block = torch.rand(3, 8, generator=gen)  # s1 | s2, one row per sample each
    m = JaggedTensor(values=torch.rand(4, 4, generator=gen), lengths=torch.tensor([1, 0, 3]))
    single = KeyedTensor(keys=["s1", "s2"], length_per_key=[4, 4], values=block)
    got = pooling({"m": m}, single=single)
    ones = torch.ones(3, dtype=torch.long)
    expected = pooling(
        {
            "s1": JaggedTensor(values=block[:, :4], lengths=ones),
            "m": m,
            "s2": JaggedTensor(values=block[:, 4:], lengths=ones),
        }
    )
    assert got.keys() == features
    torch.testing.assert_close(got.values(), expected.values())
    with pytest.raises(ValueError, match="distinct features"):
        pooling({"m": m}, single=KeyedTensor(["s1", "x"], [4, 4], block))
    with pytest.raises(ValueError, match="no rows"):
        pooling({}, single=single)
    pooling.use_retrain([4, 4, 4], {f: torch.ones(9, dtype=torch.bool) for f in features})
    with pytest.raises(ValueError, match="row IDs"):
        pooling({"m": m}, single=single)


def test_single_rows_of_empty_samples_are_zero_with_id_zero() -> None:
    config = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=10, feature_names=["f"])
    ebc = EmbeddingBagCollection(tables=[config])
    kjt = KeyedJaggedTensor(["f"], values=torch.tensor([7, 2]), lengths=torch.tensor([1, 0, 1]))
    rows = single_rows(ebc(kjt), kjt, with_ids=True)["f"]
    assert rows.lengths().tolist() == [1, 1, 1]
    assert rows.weights().tolist() == [7, 0, 2]
    assert rows.values()[1].abs().sum() == 0
    two = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2]), lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="more than one ID"):
        single_rows(ebc(two), two)


def test_sparsity_counts_kept_parameters() -> None:
    # 1 - (50*16 + 10*64) / (100*64 + 20*64)
    assert sparsity([50, 10], [16, 64], [100, 20], [64, 64]) == pytest.approx(
        1 - (50 * 16 + 10 * 64) / (120 * 64)
    )
    assert sparsity([100, 20], [64, 64], [100, 20], [64, 64]) == 0.0
    with pytest.raises(ValueError):
        sparsity([1], [1, 2], [1], [1])


# --------------------------------------------------------------------------- search


def _distance_fitness(hidden: tuple[int, ...], calls: list[int] | None = None):
    def fitness(candidates: list[tuple[int, ...]]) -> list[float]:
        if calls is not None:
            calls.append(len(candidates))
        return [-float(sum(abs(a - b) for a, b in zip(c, hidden, strict=True))) for c in candidates]

    return fitness


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_the_optimum_of_a_synthetic_fitness(seed: int) -> None:
    hidden = (3, 8, 1, 6)
    calls: list[int] = []
    search = EvolutionarySearch([8] * 4, SearchConfig(seed=seed))
    best, fitness = search.run(_distance_fitness(hidden, calls))
    assert best == hidden and fitness == 0.0
    assert calls == [20] * 30  # one call per round, the whole population at once
    assert len(search.history) == 30
    assert search.history[-1].best_so_far == 0.0
    assert search.history[0].best < 0.0
    best_so_far = [h.best_so_far for h in search.history]
    assert best_so_far == sorted(best_so_far)


def test_search_improves_on_the_paper_sized_problem() -> None:
    hidden = tuple((7 * f) % 64 + 1 for f in range(26))
    search = EvolutionarySearch([64] * 26, SearchConfig(seed=0))
    _, fitness = search.run(_distance_fitness(hidden))
    assert fitness > 0.6 * search.history[0].best  # distances are negative
    assert all(1 <= d <= 64 for c in search.population for d in c)


def test_search_is_deterministic_by_seed() -> None:
    def run(seed: int) -> tuple[tuple[int, ...] | None, list]:
        search = EvolutionarySearch([16] * 6, SearchConfig(rounds=8, seed=seed))
        search.run(_distance_fitness((1, 2, 3, 4, 5, 6)))
        return search.best, search.history

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_search_state_round_trips_through_json_and_resumes_exactly() -> None:
    fitness = _distance_fitness((5, 1, 16, 9, 12, 2))
    config = SearchConfig(rounds=12, seed=3)
    whole = EvolutionarySearch([16] * 6, config)
    whole.run(fitness)

    first = EvolutionarySearch([16] * 6, config)
    for _ in range(5):
        first.step(fitness)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = EvolutionarySearch.from_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    resumed.run(fitness)
    assert resumed.state_dict() == whole.state_dict()
    assert (resumed.best, resumed.best_fitness) == (whole.best, whole.best_fitness)
    with pytest.raises(RuntimeError):
        resumed.step(fitness)


def test_search_rejects_bad_configurations_and_scores() -> None:
    with pytest.raises(ValueError):
        SearchConfig(parents=30)
    with pytest.raises(ValueError):
        EvolutionarySearch([0, 4])
    search = EvolutionarySearch([4, 4])
    with pytest.raises(ValueError, match="scores"):
        search.step(lambda cands: [0.0])
    with pytest.raises(ValueError, match="NaN"):
        search.step(lambda cands: [float("nan")] * len(cands))
