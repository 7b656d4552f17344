"""A fix to the FuxiCTR model zoo's DLRM, applied by fuxictr_run.py (so it runs in the peer
venv): it imports nothing, and touches a model only through the object it is given.
"""

from __future__ import annotations

from typing import Any


def column_numeric_inputs(model: Any) -> list[str]:
    """Give numeric inputs shape (batch, 1) for models that concatenate them raw.

    FuxiCTR's loaders yield a scalar column as shape (batch,); FeatureEmbedding reshapes
    it, but the zoo's DLRM concatenates the raw tensors on the last axis, so its bottom MLP
    gets (1, batch) and fails on any log with a numeric feature (BARS' DLRM runs had none).
    """
    numeric = [k for k, v in model.feature_map.features.items() if v["type"] == "numeric"]
    get_inputs = model.get_inputs

    def patched(inputs: dict[str, Any], feature_source: Any = None) -> dict[str, Any]:
        x = get_inputs(inputs, feature_source)
        for k in numeric:
            if k in x and x[k].dim() == 1:
                x[k] = x[k].unsqueeze(-1)
        return x

    model.get_inputs = patched
    return numeric
