"""CTR models: shapes, interaction operators against slow references, learning, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim, export

from models.ctr import DLRM, CtrModel, DeepFM, build_ctr_model
from models.layers import CrossLayer, DotInteraction, fm_interaction
from recsys.config import ModelConfig

SMALL = {"dense_arch": [16, 8], "over_arch": [16], "cross_layers": 2}

# (model config, num_dense, sparse_dims): every model, with and without dense inputs, and
# unequal widths for the models that accept them.
CASES = [
    pytest.param(ModelConfig(name="dlrm", **SMALL), 4, [8, 8, 8], id="dlrm"),
    pytest.param(ModelConfig(name="dlrm", **SMALL), 0, [8, 8], id="dlrm-no-dense"),
    pytest.param(ModelConfig(name="deepfm", **SMALL), 3, [8, 8, 8], id="deepfm"),
    pytest.param(ModelConfig(name="deepfm", **SMALL), 0, [8, 4, 6], id="deepfm-mixed-dims"),
    pytest.param(ModelConfig(name="dcnv2", **SMALL), 3, [8, 4], id="dcnv2"),
    pytest.param(
        ModelConfig(name="dcnv2", cross_low_rank=3, dropout=0.2, **SMALL),
        0,
        [8, 8],
        id="dcnv2-low-rank",
    ),
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
    model = DLRM(ModelConfig(name="dlrm", **SMALL), 4, [8, 8, 8]).eval()
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
    model = DeepFM(ModelConfig(name="deepfm", **SMALL), 0, [8, 4, 6])
    embeddings = torch.randn(2, 18)
    fields = model.fm_fields(embeddings)
    assert fields.shape == (2, 3, 8)
    torch.testing.assert_close(fields[:, 0], embeddings[:, :8])
    assert DeepFM(ModelConfig(name="deepfm", **SMALL), 0, [8, 8]).lifts is None


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
    model = build_ctr_model(ModelConfig(name=name, **SMALL), 4, sparse_dims)
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
        build_ctr_model(ModelConfig(name="dlrm", **SMALL), num_dense, sparse_dims)


def test_models_need_a_sparse_feature():
    with pytest.raises(ValueError, match="sparse_dims"):
        build_ctr_model(ModelConfig(name="dcnv2", **SMALL), 3, [])
