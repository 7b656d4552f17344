"""The sections of an experiment besides features and tables: model, data, train, eval,
export and OptEmbed's stages."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from recsys.config.base import PositiveInt, Strict

SEQUENCE_MODELS = ("din", "twin", "twin_proj", "dare")


class ModelConfig(Strict):
    """CTR models (dlrm, deepfm, dcnv2) read pooled embeddings; sequence models (din,
    twin, twin_proj, dare) read features.sequences as item, category behaviours."""

    name: Literal["dlrm", "deepfm", "dcnv2", "din", "twin", "twin_proj", "dare"] = "dlrm"
    # CTR models' MLPs: Linear -> BatchNorm (batch_norm) -> ReLU -> Dropout per hidden layer.
    dense_arch: list[PositiveInt] = Field(default_factory=lambda: [512, 256, 64])
    over_arch: list[PositiveInt] = Field(default_factory=lambda: [512, 256])
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    batch_norm: bool = False
    cross_layers: PositiveInt = 3  # DCN-v2
    cross_low_rank: PositiveInt | None = None  # DCN-v2 low-rank (mixture-free) cross
    # DCN-v2: stacked (cross net, then the MLP) or parallel (both on x0, logit over both).
    cross_structure: Literal["stacked", "parallel"] = "stacked"
    top_k: PositiveInt = 20  # twin, twin_proj, dare: behaviours kept by the search
    din_length: PositiveInt = 200  # din: the most recent behaviours it attends over
    # Sequence models: rows of the time-position tables (row 0: the target; row p: the
    # p-th most recent behaviour; older behaviours share the last row).
    time_positions: PositiveInt = 256

    @property
    def is_sequence(self) -> bool:
        return self.name in SEQUENCE_MODELS

    @model_validator(mode="after")
    def _keys_of_other_models(self) -> ModelConfig:
        """A key the chosen model does not read is refused, unless at its default (as a
        saved config writes it)."""
        for key, models in _MODEL_KEYS.items():
            if self.name in models:
                continue
            default = ModelConfig.model_fields[key].get_default(call_default_factory=True)
            if getattr(self, key) != default:
                raise ValueError(f"{key} is read by models {list(models)}, not by {self.name!r}")
        return self


_CTR = ("dlrm", "deepfm", "dcnv2")
_MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "dense_arch": ("dlrm",),
    "over_arch": _CTR,
    "dropout": _CTR,
    "batch_norm": _CTR,
    "cross_layers": ("dcnv2",),
    "cross_low_rank": ("dcnv2",),
    "cross_structure": ("dcnv2",),
    "top_k": ("twin", "twin_proj", "dare"),
    "din_length": ("din",),
    "time_positions": SEQUENCE_MODELS,
}


class OptEmbedSearchConfig(Strict):
    """Evolutionary search over per-feature dims (`recsys search`); the paper's defaults:
    population 20 = 10 mutations + 10 crossovers bred from the top 10, 30 rounds."""

    rounds: PositiveInt = 30
    mutations: Annotated[int, Field(ge=0)] = 10
    crossovers: Annotated[int, Field(ge=0)] = 10
    parents: PositiveInt = 10
    mutate_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 0.1
    seed: int = 0
    workers: PositiveInt = 2  # Ray actors scoring candidates in parallel

    @model_validator(mode="after")
    def _population(self) -> OptEmbedSearchConfig:
        if self.mutations + self.crossovers < 1:
            raise ValueError("mutations + crossovers (the population) must be at least 1")
        if self.parents > self.mutations + self.crossovers:
            raise ValueError(
                f"parents ({self.parents}) cannot exceed the population "
                f"({self.mutations + self.crossovers})"
            )
        return self


class OptEmbedConfig(Strict):
    """OptEmbed (Lyu et al., CIKM 2022) for the `variant: optembed` tables.

    `stage: supernet` trains per-feature row-pruning thresholds (their own SGD at
    `threshold_lr`, `alpha * sum exp(-t)` added to the loss) with dims sampled per sample
    from 1..embedding_dim; `recsys search` then picks dims; `stage: retrain` (written by
    `recsys retrain`) trains with those `dims` and the supernet's row masks fixed.
    Defaults are the paper's (DCN on Criteo); alpha ranges 1e-6..1e-4 there.
    """

    alpha: Annotated[float, Field(ge=0.0)] = 1e-5
    threshold_lr: Annotated[float, Field(gt=0.0)] = 1e-4
    norm: Literal[1, 2] = 1  # row norm compared with the threshold: L1 (paper) or L2
    stage: Literal["supernet", "retrain"] = "supernet"
    dims: dict[str, PositiveInt] | None = None  # retrain: one dim per optembed feature
    supernet_run: str | None = None  # retrain: the supernet run its row masks come from
    search: OptEmbedSearchConfig = Field(default_factory=lambda: OptEmbedSearchConfig())


class LogitStd(Strict):
    dense: Annotated[float, Field(ge=0.0)] = 0.35
    bias: Annotated[float, Field(ge=0.0)] = 0.9
    pairs: Annotated[float, Field(ge=0.0)] = 0.7
    user: Annotated[float, Field(ge=0.0)] = 0.5


class CtrSyntheticConfig(Strict):
    """Criteo-like click logs with a planted click model (see recsys.synth)."""

    family: Literal["ctr"] = "ctr"
    seed: int = 0
    days: PositiveInt = 7
    # Sparse vocabularies are spread log-uniformly between these sizes across features...
    vocab_min: PositiveInt = 10
    vocab_max: PositiveInt = 100_000_000
    # ...unless named here explicitly.
    vocab: dict[str, PositiveInt] = Field(default_factory=dict)
    zipf_exponent: Annotated[float, Field(gt=1.0)] = 1.1
    # Share of each feature's active vocabulary replaced by new IDs per day.
    daily_drift: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    latent_dim: PositiveInt = 8
    noise: Annotated[float, Field(ge=0.0)] = 0.5
    # Spread (std, in logits) of each part of the planted click logit: dense features,
    # first-order ID effects, pairwise ID interactions, user x item affinity. The defaults
    # give an oracle AUC near 0.78; a smaller `pairs` makes the log learnable from fewer rows.
    logit_std: LogitStd = Field(default_factory=lambda: LogitStd())
    base_ctr: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    max_bag: PositiveInt = 5  # multi-valued features draw 1..max_bag IDs
    num_users: PositiveInt = 100_000  # user population (Zipf-ish activity) behind user_id


class SequenceSyntheticConfig(Strict):
    """Taobao-like behaviour logs with decoupled attention/representation factors."""

    family: Literal["sequence"] = "sequence"
    seed: int = 0
    days: PositiveInt = 7
    num_users: PositiveInt = 10_000
    num_items: PositiveInt = 1_000_000
    num_categories: PositiveInt = 1_000
    min_history: PositiveInt = 50
    max_history: PositiveInt = 5_000
    latent_dim: PositiveInt = 8
    noise: Annotated[float, Field(ge=0.0)] = 0.5
    item_feature: str = "item_id"
    category_feature: str = "category_id"


class DataConfig(Strict):
    """Where the logs are and which rows validate.

    Paths are a Parquet file, a directory (searched recursively) or a glob. Validation reads
    `valid` when given; otherwise it holds rows of `train` out by `split`: the newest
    `valid_days` UTC days (days), a seeded `valid_ratio` of rows (random), or each user's
    newest timestamp (leave_last: users seen at one timestamp only stay in training).
    """

    train: str | None = None
    valid: str | None = None
    test: str | None = None  # what `recsys evaluate` scores when not given --data
    split: Literal["days", "random", "leave_last"] = "days"
    valid_days: Annotated[int, Field(ge=0)] = 1  # split days; 0: no validation
    valid_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1  # split random
    split_seed: int = 0  # split random: which rows; fixed apart from train.seed on purpose
    # error: the first bad row stops the run with its file, column and row;
    # skip: bad rows are dropped and counted per file and per reason.
    on_bad_rows: Literal["error", "skip"] = "error"
    # Rows of the local shuffle buffer each worker draws its batches from, in a new seeded
    # order every epoch (train.seed, epoch, rank); 0 reads the log in file order.
    shuffle_buffer: Annotated[int, Field(ge=0)] = 65_536
    synthetic: CtrSyntheticConfig | SequenceSyntheticConfig | None = Field(
        default=None, discriminator="family"
    )

    @model_validator(mode="after")
    def _split_keys_used(self) -> DataConfig:
        """A split key the chosen split does not read is refused unless at its default (a
        dumped config, which holds every key, must load again)."""
        readers = {"valid_days": "days", "valid_ratio": "random", "split_seed": "random"}
        if self.valid is not None:
            readers["split"] = "none"
        for key, split in readers.items():
            if getattr(self, key) == DataConfig.model_fields[key].default:
                continue
            if self.valid is not None:
                raise ValueError(f"data.{key}: has no effect when data.valid is given")
            if self.split != split:
                raise ValueError(
                    f"data.{key}: only split {split!r} reads it (split is {self.split!r})"
                )
        return self

    @property
    def has_validation(self) -> bool:
        return self.valid is not None or self.split != "days" or self.valid_days > 0


class FollowConfig(Strict):
    """`recsys train --follow DIR`: train on the log's partitions as they appear.

    A partition is a Parquet file directly in DIR or a folder holding Parquet files (a
    Hive folder such as `day=2026-01-01/`, at any depth). It is taken once complete: at
    once when it holds a `_SUCCESS` marker, otherwise when its files, sizes and
    modification times are the same at two looks `poll_s` apart and every file's Parquet
    footer reads (`require_marker` waits for the marker instead). Partitions train in
    order of their events' timestamps, each for `train.epochs` passes.

    Every `export_every_s` seconds (0: after each partition) the newest checkpoint is
    exported as a subfolder of `export_dir`, the folder `recsys serve --follow` reads:
    every `full_every`-th export in full, the others as deltas over the newest full one;
    exports older than the newest `keep_full` full ones (and their deltas) are deleted.
    """

    poll_s: Annotated[float, Field(gt=0.0)] = 30.0
    require_marker: bool = False
    export_dir: str | None = None  # default: <run>/exports
    export_every_s: Annotated[float, Field(ge=0.0)] = 600.0
    full_every: PositiveInt = 10
    keep_full: PositiveInt = 2


class TrainConfig(Strict):
    workers: PositiveInt = 1
    batch_size: PositiveInt = 4096
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    # The tables' optimizer, fused into fbgemm's backward (adam: CUDA only).
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    sparse_lr: Annotated[float, Field(gt=0.0)] = 0.05
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: Annotated[float, Field(gt=0.0)] = 1e-3
    # L2 of the embedding rows a batch looks up, each distinct row once (a loss term: the
    # row's gradient gains lambda * w); rows it does not read are left alone (see README).
    embedding_l2: Annotated[float, Field(ge=0.0)] = 0.0
    dense_l2: Annotated[float, Field(ge=0.0)] = 0.0  # L2 of dense weights (the optimizer's)
    # Gradient norm of the dense parameters clipped to this (tables update inside backward).
    clip_grad_norm: Annotated[float, Field(gt=0.0)] | None = None
    # Reduce on plateau: every validation without a better `monitor` multiplies every
    # learning rate by lr_decay, down to min_lr (FuxiCTR's recipe: 0.1 and 1e-6).
    lr_decay: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    min_lr: Annotated[float, Field(ge=0.0)] = 1e-6
    seed: int = 0
    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt | None = None
    # Validation on the held-out split (data.valid_days) at every epoch's end, also every
    # `validate_every` steps when set, and at the last step. The checkpoint of the best
    # `monitor` value is kept beside the newest `keep_checkpoints`; `evaluate` and
    # `export` read it unless told otherwise.
    validate_every: PositiveInt | None = None
    monitor: Literal["auc", "logloss", "gauc"] = "auc"
    # Stop after this many validations in a row without a better `monitor` (None: never).
    patience: PositiveInt | None = None
    # Ray Train restarts a failed worker group this many times, each from the newest
    # complete checkpoint (checkpoint_every sets how much work a failure can cost).
    max_failures: Annotated[int, Field(ge=0)] = 3
    keep_checkpoints: PositiveInt = 2  # the newest N checkpoints and the best; others go
    run_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    follow: FollowConfig = Field(default_factory=lambda: FollowConfig())


class EvalConfig(Strict):
    report_dir: str | None = None  # default: <run>/eval
    # GAUC groups rows by features.user_id; rows of users with one class only are skipped.
    gauc: bool = True


class ExportConfig(Strict):
    out: str | None = None
    dtype: Literal["float32", "float16", "int8"] = "float32"
