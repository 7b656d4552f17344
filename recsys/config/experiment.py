"""The whole experiment and the rules that span its sections (a feature in one table, a
model's needs of its tables, OptEmbed's stages)."""

from __future__ import annotations

from pydantic import Field, model_validator

from recsys.config.base import Strict
from recsys.config.features import FeaturesConfig
from recsys.config.sections import (
    CtrSyntheticConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    ModelConfig,
    OptEmbedConfig,
    SequenceSyntheticConfig,
    TrainConfig,
)
from recsys.config.tables import TableConfig


class ExperimentConfig(Strict):
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
        self._table_widths()
        self._optimizer_rules()
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
        self._validation_rules()
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
        stray = sorted(decoupled - targets)
        if stray:
            raise ValueError(f"variant 'decoupled' is for sequence targets, not {stray}")

    def _optimizer_rules(self) -> None:
        if self.train.embedding_l2 and self.model.is_sequence:
            raise ValueError(
                "train.embedding_l2 regularizes CTR models' pooled embeddings, not model "
                f"{self.model.name!r}"
            )

    def _table_widths(self) -> None:
        """fbgemm's TBE kernels (what torchrec shards tables into) take rows whose width
        divides by 4; refused here rather than minutes later inside the sharder."""
        for i, table in enumerate(self.tables):
            for key in ("embedding_dim", "attention_dim"):
                dim = getattr(table, key, None)  # attention_dim: decoupled only
                if dim is not None and dim % 4:
                    nearest = sorted({max(4, dim - dim % 4), dim + 4 - dim % 4})
                    raise ValueError(
                        f"tables[{i}]: {key} {dim} is not a multiple of 4, which fbgemm's "
                        f"table kernels need; use {' or '.join(map(str, nearest))}"
                    )

    def _validation_rules(self) -> None:
        """Keys that act on validation need a validation split; GAUC needs its groups."""
        t = self.train
        if not self.data.has_validation:
            for key in ("validate_every", "patience", "lr_decay"):
                if getattr(t, key) is not None:
                    raise ValueError(
                        f"train.{key}: no validation split to act on (data.valid_days is 0)"
                    )
        if self.data.split == "leave_last" and not self.features.user_id:
            raise ValueError("data.split: 'leave_last' needs features.user_id to group rows by")
        if t.monitor == "gauc" and not (self.features.user_id and self.eval.gauc):
            raise ValueError(
                "train.monitor: 'gauc' needs features.user_id and eval.gauc to group rows by"
            )

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
