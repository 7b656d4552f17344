"""How Ray Train hands the datasets to the workers, in a module of its own.

Ray Train pickles the ingest config by reference into its controller and dataset-manager
processes, which import this module: kept free of torch and torchrec (which the driver
module imports), those two processes stay at Ray's own size and start sooner.
"""

from __future__ import annotations

from typing import Any

from ray.train import DataConfig


class TrainingIngest(DataConfig):
    """Ray Train's ingest with the training stream's order kept, and validation split
    without dropping rows.

    Order: the seeded local shuffle must see the same rows in the same order on every run
    (what exact resume needs; it costs the read tasks' freedom to hand blocks on as soon as
    they finish). Validation: `streaming_split(equal=True)`, Ray's default, drops up to
    one row per worker to balance them; validation scores every row instead, the ranks
    keeping in step by themselves (`validation.validate`).
    """

    def __init__(self) -> None:
        options = DataConfig.default_ingest_options()
        options.preserve_order = True
        super().__init__(datasets_to_split=["train"], execution_options={"train": options})

    def configure(self, datasets: dict, world_size: int, *args: Any, **kwargs: Any) -> list:
        rest = {name: ds for name, ds in datasets.items() if name != "valid"}
        shards = super().configure(rest, world_size, *args, **kwargs)
        if "valid" in datasets:
            valid = datasets["valid"]
            for shard, part in zip(shards, valid.streaming_split(world_size), strict=True):
                shard["valid"] = part
        return shards
