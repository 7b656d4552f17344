"""Typed experiment configuration: the one place where every default lives.

Pydantic (v2) rather than OmegaConf structured configs: pydantic already ships with Ray, it
validates types strictly, `extra="forbid"` rejects unknown keys, cross-field rules are plain
methods, and every error carries the dotted location of the offending key, which
`load_config` prefixes with the file name so a user sees `conf/x.yaml: tables[0].dim: ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]


class ConfigError(ValueError):
    """A configuration problem, with the file and key that caused it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Named(_Strict):
    """A YAML list of these may hold bare names (`- C1`) as shorthand for `{name: C1}`."""

    name: str

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


# --------------------------------------------------------------------------- features


class DenseFeature(_Named):
    # Value for a null cell; None makes a null bad input (error or skip, per data.on_bad_rows).
    fill_null: float | None = None
    # log(1 + x) for x > 0 (values <= 0 kept): the usual treatment of Criteo's heavy-tailed counts.
    log: bool = False


class SparseFeature(_Named):
    """A categorical feature of raw 64-bit IDs: `int64` (single) or `list<int64>` (multi)."""

    multi_valued: bool = False
    # Raw IDs are often hashes that use the whole int64 range; by default negatives are rejected.
    allow_negative: bool = False
    # A null cell (or null list) becomes "no IDs for this row" (length 0 in the jagged tensor).
    allow_null: bool = False


class SequenceFeature(_Strict):
    """A behaviour history column (`list<int64>`), looked up in the table of its `target`."""

    name: str
    target: str  # the sparse feature of the candidate item it is compared with
    allow_null: bool = False


class FeaturesConfig(_Strict):
    label: str = "label"
    user_id: str | None = "user_id"
    timestamp: str = "timestamp"
    dense: list[DenseFeature] = Field(default_factory=list)
    sparse: list[SparseFeature] = Field(default_factory=list)
    sequences: list[SequenceFeature] = Field(default_factory=list)
    # Optional list<int64> of event times aligned with the sequence columns.
    sequence_timestamps: str | None = None

    @model_validator(mode="after")
    def _unique_columns(self) -> FeaturesConfig:
        names = [self.label, self.timestamp, *(f.name for f in self.dense)]
        names += [f.name for f in self.sparse] + [s.name for s in self.sequences]
        if self.user_id and self.user_id not in {f.name for f in self.sparse}:
            names.append(self.user_id)
        if self.sequence_timestamps:
            names.append(self.sequence_timestamps)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"column {name!r} is declared twice")
            seen.add(name)
        sparse = {f.name for f in self.sparse}
        for f in self.sparse:
            if f.name == self.user_id and f.multi_valued:
                raise ValueError(f"sparse feature {f.name!r} is the user_id column: single-valued")
        for seq in self.sequences:
            if seq.target not in sparse:
                raise ValueError(
                    f"sequence {seq.name!r}: target {seq.target!r} is not a sparse feature"
                )
        return self

    def column_names(self) -> list[str]:
        """Every column read, once (user_id may also be a sparse feature)."""
        cols = [self.label, self.timestamp]
        if self.user_id and self.user_id not in {f.name for f in self.sparse}:
            cols.append(self.user_id)
        cols += [f.name for f in self.dense] + [f.name for f in self.sparse]
        cols += [s.name for s in self.sequences]
        if self.sequence_timestamps:
            cols.append(self.sequence_timestamps)
        return cols


# --------------------------------------------------------------------------- tables

Sharding = Literal[
    "auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel"
]


_STORED = ("decoupled", "optembed")  # variants layered over a `storage` table


class TableConfig(_Strict):
    """A group of features with the same table settings.

    `shared: false` (default) gives each feature its own table, named after the feature;
    `shared: true` makes the features read one table called `name`.

    Variants: `full` (a vocabulary row per ID), `hash` (the hashing trick), `multiplexed`
    (Unified Embedding: all the group's features read one table called `name`, each with its
    own hash functions, `probes` lookups per feature concatenated into a `probes * dim`
    embedding) and `qr` (the quotient-remainder trick: each feature reads two tables,
    `<table>@q` and `<table>@r`, of `num_embeddings` rows together, concatenated to 2 * dim).
    `decoupled` (DARE, sequence models' item features only): two tables per name,
    `<table>@att` of `attention_dim` columns for attention scores and `<table>@rep` of
    `embedding_dim` for representations, each a `storage` table (`full`, `hash` or
    `collisionless`, whose one ID map serves both tables).
    `optembed` (learned row pruning and searched per-feature dims; see `OptEmbedConfig`)
    keeps its rows as a `storage` table, `full` or `hash`, which it reads as that variant does.
    `collisionless` (Monolith: every admitted raw ID owns a row through a dynamic ID map;
    `capacity` rows per training worker, IDs sharded over workers by hash bucket, a
    frequency filter (`min_count`), expiry (`ttl`) and a policy when full).
    """

    name: str | None = None
    features: list[str]
    shared: bool = False
    variant: Literal[
        "full", "hash", "multiplexed", "qr", "collisionless", "decoupled", "optembed"
    ] = "full"
    # full: optional cap on vocabulary rows; hash: buckets per table; multiplexed: rows of
    # the shared table; qr: rows per feature over its two tables.
    num_embeddings: PositiveInt | None = None
    embedding_dim: PositiveInt = 64
    # multiplexed: lookups per feature, one number for all or per feature (others get 1).
    probes: PositiveInt | dict[str, PositiveInt] | None = None
    # full: IDs seen fewer times than this in the training logs go to the OOV row;
    # collisionless: an ID gets a row at its min_count-th sighting (count-min filter), and
    # reads the table's default embedding until then.
    min_count: PositiveInt = 1
    # collisionless: rows per training worker (the table has capacity * train.workers rows).
    capacity: PositiveInt | None = None
    # collisionless: rows unseen for `ttl` seconds of event time (the log's timestamp column)
    # are freed, checked every `evict_every` seconds of event time; None never expires.
    ttl: PositiveInt | None = None
    evict_every: PositiveInt = 3600
    # collisionless: when no row is free, evict the least recently / least often seen rows.
    # (The ID map's `grow` and `fallback` policies are refused for tables, see below.)
    policy: Literal["evict_lru", "evict_lfu", "grow", "fallback"] = "evict_lru"
    # collisionless: count-min filter cells per row of its 4 and worker (power of two; default:
    # the smallest power of two >= 2 * capacity), spread over the worker's buckets (a power
    # of two per bucket) so that a checkpoint restores onto any number of workers; only used
    # when min_count > 1.
    filter_width: PositiveInt | None = None
    # collisionless: hash buckets that own IDs; each worker owns a contiguous range of them.
    buckets: PositiveInt = 4096
    pooling: Literal["sum", "mean"] = "sum"
    sharding: Sharding = "auto"
    # decoupled: width of the attention table (default embedding_dim).
    attention_dim: PositiveInt | None = None
    # decoupled, optembed: how the rows are stored and found, a vocabulary (`full`) or the
    # hashing trick (`hash`, needs num_embeddings); decoupled defaults to `full`. Both may
    # also keep them `collisionless` (the keys above apply; optembed's masks prune admitted
    # rows; a decoupled feature's two tables share one ID map).
    storage: Literal["full", "hash", "collisionless"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TableConfig:
        if not self.features:
            raise ValueError("a table needs at least one feature")
        if self.shared and not self.name:
            raise ValueError("shared: true needs a table name")
        if not self.shared and self.name and len(self.features) > 1 and not self._multiplexed:
            raise ValueError(
                "name is only for shared tables or single-feature tables; "
                "unshared tables are named after their features"
            )
        if self.variant == "optembed" and self.storage is None:
            raise ValueError("variant 'optembed' needs storage: full, hash or collisionless")
        if self.storage == "collisionless" and self.variant not in _STORED:
            raise ValueError(
                f"storage 'collisionless' is only for variants {list(_STORED)}, "
                f"not {self.variant!r}"
            )
        if self.storage is not None and self.variant not in _STORED:
            raise ValueError(f"storage is only for variants {list(_STORED)}, not {self.variant!r}")
        if self.attention_dim is not None and self.variant != "decoupled":
            raise ValueError(f"attention_dim is only for variant 'decoupled', not {self.variant!r}")
        needs = {
            "hash": "the number of buckets",
            "multiplexed": "the rows of the shared table",
            "qr": "the rows per feature over its two tables",
        }
        if self.storage_variant in needs and self.num_embeddings is None:
            stored = f" with storage {self.storage!r}" if self.variant in _STORED else ""
            raise ValueError(
                f"variant {self.variant!r}{stored} needs num_embeddings "
                f"({needs[self.storage_variant]})"
            )
        if self._multiplexed and not self.name:
            raise ValueError("variant 'multiplexed' needs a name for its shared table")
        if self.variant == "qr":
            if self.shared:
                raise ValueError("variant 'qr' gives every feature its own tables: not shared")
            if self.num_embeddings is not None and self.num_embeddings < 2:
                raise ValueError("variant 'qr' needs num_embeddings >= 2 (one row per table)")
        self._check_collisionless()
        if self.probes is not None and not self._multiplexed:
            raise ValueError(f"probes is only for variant 'multiplexed', not {self.variant!r}")
        if isinstance(self.probes, dict):
            unknown = sorted(self.probes.keys() - set(self.features))
            if unknown:
                raise ValueError(f"probes names features not in this table: {unknown}")
        return self

    def _check_collisionless(self) -> None:
        if self.storage_variant != "collisionless":
            for key, default in _COLLISIONLESS_DEFAULTS.items():
                if getattr(self, key) != default:
                    raise ValueError(
                        f"{key} is only for variant 'collisionless' or storage 'collisionless'"
                    )
            return
        kind = "variant 'collisionless'"
        if self.variant == "decoupled":
            kind = "variant 'decoupled' with storage 'collisionless'"
        if self.variant == "optembed":
            kind = "variant 'optembed' with storage 'collisionless'"
            if self.pooling != "sum":
                # Pruned and unadmitted IDs read the default outside the masked pooling,
                # which would have to count them for a mean.
                raise ValueError(f"{kind} pools by sum; pooling {self.pooling!r} is not supported")
        if self.policy in ("grow", "fallback"):
            raise ValueError(
                f"{kind} cannot use policy {self.policy!r}: its sharded torchrec table has a "
                "fixed number of rows per worker and serving reads unknown IDs as the default "
                "embedding; use evict_lru or evict_lfu, and to grow, resume with a larger "
                "capacity (live rows move exactly)"
            )
        if self.capacity is None:
            raise ValueError(f"{kind} needs capacity (rows per worker)")
        if self.num_embeddings is not None:
            raise ValueError(
                f"{kind} sizes its table by capacity (rows per worker), not num_embeddings"
            )
        if self.sharding not in ("auto", "row_wise"):
            raise ValueError(
                f"{kind} is sharded row-wise by ID ownership; "
                f"sharding {self.sharding!r} is not possible (use auto or row_wise)"
            )
        width = self.filter_width
        if width is not None and width & (width - 1):
            raise ValueError(f"filter_width must be a power of two, got {width}")

    @property
    def uses_vocabulary(self) -> bool:
        """Whether its IDs go through a vocabulary built from the training log."""
        return self.storage_variant == "full"

    @property
    def storage_variant(self) -> str:
        """How the rows are stored and found: `storage` for decoupled and optembed tables
        (decoupled defaults to `full`), else the variant itself."""
        if self.variant in _STORED:
            return self.storage or "full"
        return self.variant

    @property
    def _multiplexed(self) -> bool:
        return self.variant == "multiplexed"

    def table_names(self) -> dict[str, str]:
        """Feature name -> table name for the features of this group.

        A `qr` feature's two tables are `<name>@q` and `<name>@r` of the name given here.
        """
        if self.shared or self._multiplexed:
            return {f: self.name for f in self.features}  # type: ignore[misc]
        if self.name:
            return {self.features[0]: self.name}
        return {f: f for f in self.features}

    def probes_of(self, feature: str) -> int:
        """Lookups `feature` makes into a multiplexed table (1 for the other variants)."""
        if isinstance(self.probes, dict):
            return self.probes.get(feature, 1)
        return self.probes or 1


_COLLISIONLESS_DEFAULTS = {
    k: TableConfig.model_fields[k].default
    for k in ("capacity", "ttl", "evict_every", "policy", "filter_width", "buckets")
}


# --------------------------------------------------------------------------- model


SEQUENCE_MODELS = ("din", "twin", "twin_proj", "dare")


class ModelConfig(_Strict):
    """CTR models (dlrm, deepfm, dcnv2) read pooled embeddings; sequence models (din,
    twin, twin_proj, dare) read features.sequences as item, category behaviours."""

    name: Literal["dlrm", "deepfm", "dcnv2", "din", "twin", "twin_proj", "dare"] = "dlrm"
    dense_arch: list[PositiveInt] = Field(default_factory=lambda: [512, 256, 64])
    over_arch: list[PositiveInt] = Field(default_factory=lambda: [512, 256])
    cross_layers: PositiveInt = 3  # DCN-v2
    cross_low_rank: PositiveInt | None = None  # DCN-v2 low-rank (mixture-free) cross
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    top_k: PositiveInt = 20  # twin, twin_proj, dare: behaviours kept by the search
    din_length: PositiveInt = 200  # din: the most recent behaviours it attends over
    # Sequence models: rows of the time-position tables (row 0: the target; row p: the
    # p-th most recent behaviour; older behaviours share the last row).
    time_positions: PositiveInt = 256

    @property
    def is_sequence(self) -> bool:
        return self.name in SEQUENCE_MODELS


# --------------------------------------------------------------------------- optembed


class OptEmbedSearchConfig(_Strict):
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


class OptEmbedConfig(_Strict):
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


# --------------------------------------------------------------------------- data, train


class LogitStd(_Strict):
    dense: Annotated[float, Field(ge=0.0)] = 0.35
    bias: Annotated[float, Field(ge=0.0)] = 0.9
    pairs: Annotated[float, Field(ge=0.0)] = 0.7
    user: Annotated[float, Field(ge=0.0)] = 0.5


class CtrSyntheticConfig(_Strict):
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


class SequenceSyntheticConfig(_Strict):
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


class DataConfig(_Strict):
    train: str | None = None  # Parquet file or directory (searched recursively)
    eval: str | None = None  # held-out log for `recsys evaluate`
    valid_days: Annotated[int, Field(ge=0)] = 1  # newest days of `train` held out for validation
    # error: the first bad row stops the run with its file, column and row;
    # skip: bad rows are dropped and counted per file and per reason.
    on_bad_rows: Literal["error", "skip"] = "error"
    synthetic: CtrSyntheticConfig | SequenceSyntheticConfig | None = Field(
        default=None, discriminator="family"
    )


class TrainConfig(_Strict):
    workers: PositiveInt = 1
    batch_size: PositiveInt = 4096
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    sparse_optimizer: Literal["rowwise_adagrad", "adam", "sgd"] = "rowwise_adagrad"
    sparse_lr: Annotated[float, Field(gt=0.0)] = 0.05
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: Annotated[float, Field(gt=0.0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    seed: int = 0
    log_every: PositiveInt = 50
    checkpoint_every: PositiveInt | None = None
    run_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"


class EvalConfig(_Strict):
    report_dir: str | None = None  # default: <run>/eval
    # GAUC groups rows by features.user_id; rows of users with one class only are skipped.
    gauc: bool = True


class ExportConfig(_Strict):
    out: str | None = None
    dtype: Literal["float32", "float16", "int8"] = "float32"


class ExperimentConfig(_Strict):
    name: str
    data: DataConfig = Field(default_factory=DataConfig)
    features: FeaturesConfig
    tables: list[TableConfig] = Field(default_factory=list)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    optembed: OptEmbedConfig = Field(default_factory=OptEmbedConfig)

    @model_validator(mode="after")
    def _cross_section_rules(self) -> ExperimentConfig:
        sparse = {f.name for f in self.features.sparse}
        owner: dict[str, int] = {}
        table_names: dict[str, int] = {}
        for i, table in enumerate(self.tables):
            for feature in table.features:
                if feature not in sparse:
                    raise ValueError(f"tables[{i}]: {feature!r} is not a sparse feature")
                if feature in owner:
                    raise ValueError(
                        f"tables[{i}]: feature {feature!r} is already in tables[{owner[feature]}]"
                    )
                owner[feature] = i
            for name in set(table.table_names().values()):
                if name in table_names and table_names[name] != i:
                    raise ValueError(
                        f"tables[{i}]: table name {name!r} is already used by "
                        f"tables[{table_names[name]}]"
                    )
                table_names[name] = i
        if self.tables:
            missing = sorted(sparse - owner.keys())
            if missing:
                raise ValueError(f"sparse features without a table: {missing}")
        if self.model.name == "dlrm" and self.tables:
            # Wider embeddings (probes, qr) enter models.ctr.DLRM as embedding_dim chunks.
            dims = {t.embedding_dim for t in self.tables}
            if len(dims) > 1:
                raise ValueError(f"model 'dlrm' needs one embedding_dim for all tables, got {dims}")
            if self.model.dense_arch[-1] not in dims and self.features.dense:
                raise ValueError(
                    f"model 'dlrm': dense_arch must end at the embedding_dim {dims.pop()} "
                    f"(got {self.model.dense_arch[-1]}) for the dot interaction"
                )
        self._check_optembed()
        for i, table in enumerate(self.tables):
            if table.variant == "collisionless" and self.model.is_sequence:
                # The sequence path neither passes event times to pooled tables nor reports
                # collisionless table stats; refuse before any work rather than mid-training.
                raise ValueError(
                    f"tables[{i}]: variant 'collisionless' serves CTR models' pooled features, "
                    f"not model {self.model.name!r}"
                )
            if table.storage_variant == "collisionless" and table.buckets < self.train.workers:
                raise ValueError(
                    f"tables[{i}].buckets: {table.buckets} buckets cannot be owned by "
                    f"{self.train.workers} workers (train.workers)"
                )
        hashed = {
            f: t.variant
            for t in self.tables
            if t.variant in ("multiplexed", "qr", "optembed", "collisionless")
            for f in t.features
        }
        for seq in self.features.sequences:
            if seq.target in hashed:
                raise ValueError(
                    f"sequence {seq.name!r}: its target {seq.target!r} is in a "
                    f"{hashed[seq.target]!r} table, which sequence lookups do not support"
                )
        self._sequence_rules()
        synth = self.data.synthetic
        if isinstance(synth, SequenceSyntheticConfig):
            for key in ("item_feature", "category_feature"):
                if getattr(synth, key) not in sparse:
                    raise ValueError(
                        f"data.synthetic.{key}: {getattr(synth, key)!r} is not a sparse feature"
                    )
            if synth.min_history > synth.max_history:
                raise ValueError("data.synthetic: min_history is larger than max_history")
        if isinstance(synth, CtrSyntheticConfig):
            if synth.vocab_min > synth.vocab_max:
                raise ValueError("data.synthetic: vocab_min is larger than vocab_max")
            unknown = sorted(synth.vocab.keys() - sparse)
            if unknown:
                raise ValueError(f"data.synthetic.vocab: unknown sparse features {unknown}")
        return self

    def _sequence_rules(self) -> None:
        """Sequence models: two behaviour columns (item, category) whose targets are
        single-valued and in tables of the variant the model reads (decoupled for dare)."""
        decoupled = {f for t in self.tables if t.variant == "decoupled" for f in t.features}
        if not self.model.is_sequence:
            if decoupled:
                raise ValueError(
                    f"variant 'decoupled' is for sequence models (din, twin, twin_proj, dare), "
                    f"not model {self.model.name!r}: features {sorted(decoupled)}"
                )
            return
        name = self.model.name
        seqs = self.features.sequences
        if len(seqs) != 2:
            raise ValueError(
                f"model {name!r} reads features.sequences as (item, category) behaviours: "
                f"needs exactly 2, got {len(seqs)}"
            )
        if not self.tables:
            raise ValueError(f"model {name!r} needs tables for its sequence targets")
        sparse = {f.name: f for f in self.features.sparse}
        targets = {s.target for s in seqs}
        for seq in seqs:
            target = sparse[seq.target]
            if target.multi_valued or target.allow_null:
                raise ValueError(
                    f"sequence {seq.name!r}: its target {seq.target!r} must be single-valued "
                    "and not null (one candidate per impression)"
                )
            if name == "dare" and seq.target not in decoupled:
                raise ValueError(
                    f"model 'dare' reads attention and representation tables: the table of "
                    f"{seq.target!r} needs variant 'decoupled'"
                )
            if name != "dare" and seq.target in decoupled:
                raise ValueError(
                    f"model {name!r} reads one embedding set: the table of {seq.target!r} "
                    "cannot be 'decoupled' (that is model 'dare')"
                )
        for i, table in enumerate(self.tables):
            if not targets & set(table.features):
                continue
            for key in ("embedding_dim", "attention_dim"):
                dim = getattr(table, key)
                if dim is not None and dim % 4:
                    raise ValueError(
                        f"tables[{i}]: {key} {dim} is not a multiple of 4, which fbgemm's "
                        "sharded sequence lookups need"
                    )
        stray = sorted(decoupled - targets)
        if stray:
            raise ValueError(f"variant 'decoupled' is for sequence targets, not {stray}")

    def _check_optembed(self) -> None:
        kinds = {t.variant == "optembed" for t in self.tables}
        if True in kinds and self.model.is_sequence:
            raise ValueError(
                f"variant 'optembed' serves CTR models' pooled features, not model "
                f"{self.model.name!r}"
            )
        if kinds == {True, False}:
            raise ValueError(
                "variant 'optembed' must be used by every table or none: the pruned and "
                "dimension-searched embedding layer serves all sparse features"
            )
        if self.optembed.stage != "retrain":
            return
        if kinds != {True}:
            raise ValueError("optembed.stage: 'retrain' needs tables of variant 'optembed'")
        widths = {f: t.embedding_dim for t in self.tables for f in t.features}
        dims = self.optembed.dims or {}
        missing = sorted(widths.keys() - dims.keys())
        if missing:
            raise ValueError(f"optembed.dims: retrain needs a dim for features {missing}")
        unknown = sorted(dims.keys() - widths.keys())
        if unknown:
            raise ValueError(f"optembed.dims: unknown features {unknown}")
        for feature, dim in dims.items():
            if dim > widths[feature]:
                raise ValueError(
                    f"optembed.dims.{feature}: {dim} exceeds its embedding_dim {widths[feature]}"
                )
        if not self.optembed.supernet_run:
            raise ValueError("optembed.supernet_run: retrain needs the supernet run's directory")

    @property
    def uses_optembed(self) -> bool:
        return any(t.variant == "optembed" for t in self.tables)

    def feature_tables(self) -> dict[str, str]:
        """Every sparse and sequence feature -> the name of the table it reads."""
        mapping: dict[str, str] = {}
        for table in self.tables:
            mapping.update(table.table_names())
        for seq in self.features.sequences:
            if seq.target in mapping:
                mapping[seq.name] = mapping[seq.target]
        return mapping


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.batch_size=1024` -> (["train", "batch_size"], 1024); values parse as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def _apply_override(doc: dict[str, Any], path: list[str], value: Any, text: str) -> None:
    node: Any = doc
    for depth, part in enumerate(path[:-1]):
        where = ".".join(path[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {text!r}: {where} is not an index of the list")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {text!r}: {where} is not a section")
    last = path[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {text!r}: {last} is not an index of the list")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {text!r}: {'.'.join(path[:-1])} is not a section")


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ""
        for part in e["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif part in ("CtrSyntheticConfig", "SequenceSyntheticConfig", "ctr", "sequence"):
                continue
            else:
                loc += f".{part}" if loc else str(part)
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def config_from_dict(doc: dict[str, Any], source: str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply `key=value` overrides, validate everything."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(doc, keys, value, text)
    source = str(path) + (f" (with overrides {' '.join(overrides)})" if overrides else "")
    return config_from_dict(doc, source)
