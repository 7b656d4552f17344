"""What a model's embedding tables hold in memory: known from the configs of its
(meta-device) tables before any worker starts, so that a model the host cannot hold is
refused with its sizes instead of failing minutes later in an allocation."""

from __future__ import annotations

from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

# Floats of optimizer state per row of `dim` floats, as fbgemm's fused optimizers keep it.
_STATE_PER_ROW = {
    "sgd": lambda dim: 0,
    "rowwise_adagrad": lambda dim: 1,  # one accumulator per row
    "adagrad": lambda dim: dim,
    "adam": lambda dim: 2 * dim,  # first and second moments
}


ID_BYTES = 8  # an int64 entry of a vocabulary or ID map


def row_bytes(rows: int, dim: int, optimizer: str) -> int:
    """Bytes of `rows` float32 rows of `dim` and their optimizer state."""
    return rows * (dim + _STATE_PER_ROW[optimizer](dim)) * 4


def table_bytes(model: nn.Module, optimizer: str) -> dict[str, int]:
    """Bytes of each table's rows plus its optimizer state, by table name."""
    sizes = {}
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            configs = module.embedding_bag_configs()
        elif isinstance(module, EmbeddingCollection):
            configs = module.embedding_configs()
        else:
            continue
        for c in configs:
            sizes[c.name] = row_bytes(c.num_embeddings, c.embedding_dim, optimizer)
    return sizes


def check_fits(sizes: dict[str, int], available: int, where: str) -> None:
    """Refuse tables that together exceed `available` bytes, naming the largest."""
    total = sum(sizes.values())
    if total <= available:
        return
    largest = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    named = ", ".join(f"{name} {_gib(n)}" for name, n in largest)
    raise MemoryError(
        f"the embedding tables need {_gib(total)} with their optimizer state (largest: "
        f"{named}), but {where} has {_gib(available)} available; lower num_embeddings or "
        "embedding_dim, use a hashed or collisionless variant, or train on a cluster"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"
