"""Typed experiment configuration: the one place where every default lives.

Pydantic (v2) rather than OmegaConf structured configs: pydantic already ships with Ray, it
validates types strictly, `extra="forbid"` rejects unknown keys, cross-field rules are plain
methods, and every error carries the dotted location of the offending key, which
`load_config` prefixes with the file name so a user sees `conf/x.yaml: tables[0].dim: ...`.
One module per part of the file: `features`, `tables` (a model per variant; a table's
`init` in `table_init`), `sections` (model, data, train, eval, export, optembed),
`experiment` (rules across sections), `load`.
"""

from recsys.config.base import ConfigError, PositiveInt
from recsys.config.experiment import ExperimentConfig
from recsys.config.features import DenseFeature, FeaturesConfig, SequenceFeature, SparseFeature
from recsys.config.load import config_from_dict, load_config, parse_override
from recsys.config.sections import (
    SEQUENCE_MODELS,
    CtrSyntheticConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    FollowConfig,
    ModelConfig,
    OptEmbedConfig,
    OptEmbedSearchConfig,
    SequenceSyntheticConfig,
    TrainConfig,
)
from recsys.config.table_init import NormalInit, UniformInit
from recsys.config.tables import TableConfig, table_config

__all__ = [
    "SEQUENCE_MODELS",
    "ConfigError",
    "CtrSyntheticConfig",
    "DataConfig",
    "DenseFeature",
    "EvalConfig",
    "ExperimentConfig",
    "ExportConfig",
    "FeaturesConfig",
    "FollowConfig",
    "ModelConfig",
    "NormalInit",
    "OptEmbedConfig",
    "OptEmbedSearchConfig",
    "PositiveInt",
    "SequenceFeature",
    "SequenceSyntheticConfig",
    "SparseFeature",
    "TableConfig",
    "TrainConfig",
    "UniformInit",
    "config_from_dict",
    "load_config",
    "parse_override",
    "table_config",
]
