"""A table's `init`: how its rows start, a model per distribution told apart by
`distribution` (default `normal`), as `tables:` tells variants apart.

`NormalInit` (the default) and `UniformInit`; `init: uniform` is short for
`init: {distribution: uniform}`, and a key of the other distribution is refused by name.
`tables.initializers.RowInit` draws the rows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from recsys.config.base import Strict

PositiveFloat = Annotated[float, Field(gt=0.0)]


class NormalInit(Strict):
    """Rows start as N(0, std^2), whatever the table's size (the default, std 1e-4).

    The default is FuxiCTR's (the library behind the BARS benchmark; its
    `embedding_initializer` is `partial(nn.init.normal_, std=1e-4)`) and DeepCTR's
    (`RandomNormal(stddev=1e-4)`). torchrec's own default, taken from the DLRM reference
    code, is U(-sqrt(1/rows), sqrt(1/rows)) (`UniformInit` without `bound`): its scale
    follows the table's size, so a 3-row table (gender) starts at U(-0.58, 0.58) and a
    million-row one at U(-0.001, 0.001): the features of small tables reach the dense
    layers 580 times larger than those of large ones before any training. One small scale
    treats every table alike, and costs little with the fused sparse optimizers: Adagrad's
    first steps move a row by about `sparse_lr`, whatever its gradient's size.
    """

    distribution: Literal["normal"] = "normal"
    std: PositiveFloat = 1e-4


class UniformInit(Strict):
    """Rows start as U(-bound, bound); without `bound`, torchrec's default sqrt(1 / rows)
    (rows of the physical table: a collisionless table's capacity times the workers)."""

    distribution: Literal["uniform"]
    bound: PositiveFloat | None = None


def _distribution_of(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("distribution", "normal"))
    return str(getattr(value, "distribution", value))


def init_keys(value: Any) -> Any:
    """`init: uniform` is `init: {distribution: uniform}`; an unknown distribution, or a
    key of another distribution, is refused by name."""
    if isinstance(value, str):
        value = {"distribution": value}
    if not isinstance(value, dict):
        return value  # a model already, or refused by the union
    distribution = value.get("distribution", "normal")
    model = _INITS.get(distribution)
    if model is None:
        raise ValueError(f"distribution {distribution!r} is not one of {list(_INITS)}")
    for key in value:
        if key in model.model_fields:
            continue
        owners = [d for d, m in _INITS.items() if key in m.model_fields]
        if owners:
            raise ValueError(f"{key} is only for distribution {owners[0]!r}, not {distribution!r}")
        keys = [k for k in model.model_fields if k != "distribution"]
        raise ValueError(f"{key} is not an init key; distribution {distribution!r} takes {keys}")
    return value


_INITS: dict[str, type[Strict]] = {"normal": NormalInit, "uniform": UniformInit}
INIT_DISTRIBUTIONS = tuple(_INITS)
InitConfig = Annotated[
    Annotated[NormalInit, Tag("normal")] | Annotated[UniformInit, Tag("uniform")],
    Discriminator(
        _distribution_of,
        custom_error_type="init_distribution",
        custom_error_message="init should be 'normal', 'uniform' or {distribution: ...}",
    ),
]
