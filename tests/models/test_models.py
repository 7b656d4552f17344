"""CTR models: shapes, interaction operators against slow references, learning, export."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

from models.ctr import DLRM, CtrModel, DeepFM, build_ctr_model
from models.layers import MLP, CrossLayer, DotInteraction, fm_interaction
from recsys.config import ModelConfig

SMALL = {"dense_arch": [16, 8], "over_arch": [16], "cross_layers": 2}
_READS = {
    "dlrm": ("dense_arch", "over_arch"),
    "deepfm": ("over_arch",),
    "dcnv2": ("over_arch", "cross_layers"),
}


def small(name: str, **keys: object) -> ModelConfig:
    """A small model `name`, with the keys of SMALL that it reads."""
    mine = {k: v for k, v in SMALL.items() if k in _READS[name]}
    return ModelConfig(name=name, **mine, **keys)  # type: ignore[arg-type]


# (model config, num_dense, sparse_dims): every model, with and without dense inputs, and
# unequal widths for the models that accept them.
CASES = [
    pytest.param(small("dlrm"), 4, [8, 8, 8], id="dlrm"),
    pytest.param(small("dlrm"), 0, [8, 8], id="dlrm-no-dense"),
    pytest.param(small("deepfm"), 3, [8, 8, 8], id="deepfm"),
    pytest.param(small("deepfm"), 0, [8, 4, 6], id="deepfm-mixed-dims"),
    pytest.param(small("dcnv2"), 3, [8, 4], id="dcnv2"),
    pytest.param(
        small("dcnv2", cross_low_rank=3, dropout=0.2),
        0,
        [8, 8],
        id="dcnv2-low-rank",
    ),
    pytest.param(
        small("dcnv2", cross_structure="parallel", batch_norm=True, dropout=0.2),
        2,
        [8, 8],
        id="dcnv2-parallel-bn",
    ),
    pytest.param(small("deepfm", batch_norm=True), 3, [8, 8], id="deepfm-bn"),
    pytest.param(small("dlrm", batch_norm=True, dropout=0.1), 4, [8, 8], id="dlrm-bn"),
]


def _inputs(batch: int, num_dense: int, sparse_dims: list[int]) -> tuple[torch.Tensor, ...]:
    return torch.randn(batch, num_dense), torch.randn(batch, sum(sparse_dims))


@pytest.mark.parametrize(("cfg", "num_dense", "sparse_dims"), CASES)
def test_logits_have_one_value_per_row(cfg: ModelConfig, num_dense: int, sparse_dims: list[int]):
    model = build_ctr_model(cfg, num_dense, sparse_dims)
    assert isinstance(model, CtrModel)
    logits = model(*_inputs(7, num_dense, sparse_dims))
    assert logits.shape == (7,)
    assert torch.isfinite(logits).all()


def test_dot_interaction_matches_double_loop():
    vectors = torch.randn(3, 4, 5)
    expected = torch.stack(
        [
            torch.stack([vectors[b, i] @ vectors[b, j] for i in range(4) for j in range(i + 1, 4)])
            for b in range(3)
        ]
    )
    torch.testing.assert_close(DotInteraction(4)(vectors), expected)


def test_dlrm_forward_is_top_mlp_over_bottom_and_pairwise_dots():
    torch.manual_seed(0)
    model = DLRM(small("dlrm"), 4, [8, 8, 8]).eval()
    dense, embeddings = _inputs(2, 4, [8, 8, 8])
    bottom = model.bottom(dense)
    vectors = [bottom, *embeddings.split(8, dim=1)]
    dots = [
        (vectors[i] * vectors[j]).sum(dim=1)
        for i in range(len(vectors))
        for j in range(i + 1, len(vectors))
    ]
    expected = model.top(torch.cat([bottom, torch.stack(dots, dim=1)], dim=1)).squeeze(-1)
    torch.testing.assert_close(model(dense, embeddings), expected)


def test_fm_term_is_sum_over_field_pairs():
    fields = torch.randn(3, 5, 4)
    identity = 0.5 * (fields.sum(dim=1) ** 2 - (fields**2).sum(dim=1)).sum(dim=1)
    pairs = sum((fields[:, i] * fields[:, j]).sum(dim=1) for i in range(5) for j in range(i + 1, 5))
    torch.testing.assert_close(fm_interaction(fields), identity)
    torch.testing.assert_close(fm_interaction(fields), pairs)


def test_deepfm_lifts_only_narrower_fields_to_the_widest_dim():
    model = DeepFM(small("deepfm"), 0, [8, 4, 6])
    embeddings = torch.randn(2, 18)
    fields = model.fm_fields(embeddings)
    assert fields.shape == (2, 3, 8)
    torch.testing.assert_close(fields[:, 0], embeddings[:, :8])
    assert DeepFM(small("deepfm"), 0, [8, 8]).lifts is None


@pytest.mark.parametrize("low_rank", [None, 2])
def test_cross_layer_matches_formula(low_rank: int | None):
    layer = CrossLayer(5, low_rank)
    x0, x = torch.randn(3, 5), torch.randn(3, 5)
    if low_rank is None:
        w, b = layer.weight.weight, layer.weight.bias
    else:
        down, up = layer.weight[0], layer.weight[1]
        w, b = up.weight @ down.weight, up.bias  # U V^T
    expected = x0 * (x @ w.T + b) + x
    torch.testing.assert_close(layer(x0, x), expected)


@pytest.mark.parametrize("name", ["dlrm", "deepfm", "dcnv2"])
def test_model_learns_a_function_of_one_embedding(name: str):
    torch.manual_seed(0)
    sparse_dims = [8, 8, 8]
    model = build_ctr_model(small(name), 4, sparse_dims)
    dense, embeddings = _inputs(512, 4, sparse_dims)
    labels = (embeddings[:, :8] @ torch.randn(8) > 0).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = F.binary_cross_entropy_with_logits(model(dense, embeddings), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[:: len(losses) // 10]


@pytest.mark.parametrize(("cfg", "num_dense", "sparse_dims"), CASES)
def test_export_with_dynamic_batch_matches_eager(
    cfg: ModelConfig, num_dense: int, sparse_dims: list[int]
):
    torch.manual_seed(0)
    model = build_ctr_model(cfg, num_dense, sparse_dims).eval()
    batch = Dim("batch")
    program = export(
        model,
        _inputs(4, num_dense, sparse_dims),
        dynamic_shapes={"dense": {0: batch}, "embeddings": {0: batch}},
    )
    dense, embeddings = _inputs(11, num_dense, sparse_dims)
    torch.testing.assert_close(program.module()(dense, embeddings), model(dense, embeddings))


@pytest.mark.parametrize(
    ("num_dense", "sparse_dims", "named"),
    [(4, [8, 4], "embedding dims"), (4, [12, 12], "dense_arch"), (0, [8], "two vectors")],
)
def test_dlrm_misconfiguration_names_the_cause(num_dense: int, sparse_dims: list[int], named: str):
    with pytest.raises(ValueError, match=named):
        build_ctr_model(small("dlrm"), num_dense, sparse_dims)


def test_models_need_a_sparse_feature():
    with pytest.raises(ValueError, match="sparse_dims"):
        build_ctr_model(small("dcnv2"), 3, [])


def test_mlp_orders_linear_norm_relu_dropout_and_keeps_the_head_linear():
    mlp = MLP(5, [6, 4, 1], dropout=0.3, relu_last=False, batch_norm=True)
    kinds = [type(layer).__name__ for layer in mlp]
    assert kinds == [
        *("Linear", "BatchNorm1d", "ReLU", "Dropout"),
        *("Linear", "BatchNorm1d", "ReLU", "Dropout"),
        "Linear",
    ]


def test_parallel_dcn_is_a_logit_over_cross_and_deep_side_by_side():
    torch.manual_seed(0)
    model = build_ctr_model(small("dcnv2", cross_structure="parallel"), 2, [8, 4]).eval()
    dense, embeddings = _inputs(5, 2, [8, 4])
    x0 = torch.cat([dense, embeddings], dim=1)
    x = x0
    for layer in model.cross.layers:  # type: ignore[union-attr]
        x = x0 * layer.weight(x) + x
    deep = model.deep(x0)  # type: ignore[operator]
    expected = torch.cat([x, deep], dim=1) @ model.logit.weight.T + model.logit.bias  # type: ignore[union-attr]
    torch.testing.assert_close(model(dense, embeddings), expected.squeeze(-1))
    stacked = build_ctr_model(small("dcnv2"), 2, [8, 4])
    assert stacked.logit.in_features == 16 and model.logit.in_features == 16 + 14  # type: ignore[union-attr]


def test_batch_norm_scores_a_batch_of_one_in_eval_mode():
    torch.manual_seed(0)
    model = build_ctr_model(small("deepfm", batch_norm=True), 3, [8, 8])
    model(*_inputs(64, 3, [8, 8])).sum().backward()  # running statistics move off 0 / 1
    model.eval()
    dense, embeddings = _inputs(6, 3, [8, 8])
    whole = model(dense, embeddings)
    one_by_one = torch.cat([model(dense[i : i + 1], embeddings[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(one_by_one, whole)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"name": "deepfm", "cross_layers": 4}, "cross_layers is read by models ['dcnv2']"),
        ({"name": "din", "dropout": 0.2}, "dropout is read by models"),
        ({"name": "dlrm", "top_k": 5}, "top_k is read by models"),
        ({"name": "dcnv2", "dense_arch": [8]}, "dense_arch is read by models ['dlrm']"),
    ],
)
def test_a_key_the_model_does_not_read_is_refused(keys: dict[str, object], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**keys)  # type: ignore[arg-type]
