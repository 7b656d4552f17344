"""Config: every shipped experiment loads; bad keys, types and combinations are named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from recsys.config import ConfigError, ExperimentConfig, load_config, table_config

MINIMAL = {
    "name": "t",
    "features": {"dense": ["d0"], "sparse": ["a", {"name": "b", "multi_valued": True}]},
    "tables": [
        {"features": ["a", "b"], "variant": "hash", "num_embeddings": 100, "embedding_dim": 8}
    ],
    "model": {"dense_arch": [16, 8]},
}


def _write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (Path(__file__).parents[2] / "conf").glob("*.yaml"))
)
def test_shipped_configs_load(repo: Path, name: str) -> None:
    cfg = load_config(repo / "conf" / name)
    assert isinstance(cfg, ExperimentConfig)
    assert set(cfg.feature_tables()) >= {f.name for f in cfg.features.sparse}


def test_defaults_and_shorthand(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.train.batch_size == 4096 and cfg.data.on_bad_rows == "error"
    assert cfg.features.dense[0].name == "d0" and cfg.features.dense[0].fill_null is None
    assert cfg.features.sparse[1].multi_valued
    assert cfg.feature_tables() == {"a": "a", "b": "b"}


def test_overrides_apply_with_yaml_types(tmp_path: Path) -> None:
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "train.batch_size=1024",
            "tables.0.embedding_dim=16",
            "model.dense_arch=[32, 16]",
            "data.train=/tmp/x",
        ],
    )
    assert cfg.train.batch_size == 1024
    assert cfg.tables[0].embedding_dim == 16
    assert cfg.model.dense_arch == [32, 16]
    assert cfg.data.train == "/tmp/x"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.bach_size=3"], "train.bach_size: Extra inputs are not permitted"),
        (["train.batch_size=big"], "train.batch_size: Input should be a valid integer"),
        (["train.batch_size=0"], "train.batch_size: Input should be greater than 0"),
        (
            ["tables.0.variant=cuckoo"],
            "tables[0].variant: Input should be 'full', 'hash', 'multiplexed', 'qr'",
        ),
        (["tables.0.num_embeddings=null"], "variant 'hash' needs num_embeddings"),
        (["tables.0.min_count=2"], "tables[0]: min_count is only for variants ['full', "),
        (["tables.0.probes=2"], "tables[0]: probes is only for variant 'multiplexed', not 'hash'"),
        (["tables.0.attention_dim=4"], "attention_dim is only for variant 'decoupled'"),
        (["tables.0.init.std=0"], "tables[0].init.std: Input should be greater than 0"),
        (["tables.0.init.std=-1e-4"], "tables[0].init.std: Input should be greater than 0"),
        (
            ["tables.0.init={distribution: uniform, bound: 0}"],
            "tables[0].init.bound: Input should be greater than 0",
        ),
        (
            ["tables.0.init=xavier"],
            "tables[0].init: distribution 'xavier' is not one of ['normal', 'uniform']",
        ),
        (
            ["tables.0.init={distribution: uniform, std: 0.1}"],
            "tables[0].init: std is only for distribution 'normal', not 'uniform'",
        ),
        (
            ["tables.0.init.bound=0.1"],
            "tables[0].init: bound is only for distribution 'uniform', not 'normal'",
        ),
        (
            ["tables.0.init.mean=0"],
            "tables[0].init: mean is not an init key; distribution 'normal' takes ['std']",
        ),
        (["tables.0.init=3"], "tables[0].init: init should be 'normal', 'uniform' or"),
        (["tables.0.features=[a]"], "sparse features without a table: ['b']"),
        (["tables.0.features=[a, b, zz]"], "'zz' is not a sparse feature"),
        (["model.dense_arch=[16, 4]"], "dense_arch must end at the embedding_dim 8"),
        (["features.dense=[label]"], "column 'label' is declared twice"),
        (["data.synthetic={family: ctr, vocab: {nope: 3}}"], "unknown sparse features ['nope']"),
        (["data.synthetic={family: dice}"], "data.synthetic"),
        (["tables.3.name=x"], "tables.3 is not an index of the list"),
        (["train"], "is not of the form key=value"),
        (
            ["tables.0.embedding_dim=10", "model.dense_arch=[10]"],
            "tables[0]: embedding_dim 10 is not a multiple of 4, which fbgemm's table kernels "
            "need; use 8 or 12",
        ),
        (
            ["train.lr_decay=0.1", "data.valid_days=0"],
            "train.lr_decay: no validation split to act on",
        ),
        (["train.lr_decay=1"], "train.lr_decay: Input should be less than 1"),
        (
            ["model.cross_layers=2"],
            "model: cross_layers is read by models ['dcnv2'], not by 'dlrm'",
        ),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, overrides: list[str], message: str) -> None:
    path = _write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert message in str(err.value)
    if "key=value" not in message and "index" not in message:
        assert str(path) in str(err.value)


def test_table_init_defaults_to_normal_1e_4_and_takes_either_distribution(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, MINIMAL)
    init = load_config(path).tables[0].init
    assert (init.distribution, init.std) == ("normal", 1e-4)
    init = load_config(path, ["tables.0.init.std=0.01"]).tables[0].init
    assert (init.distribution, init.std) == ("normal", 0.01)
    init = load_config(path, ["tables.0.init=uniform"]).tables[0].init
    assert (init.distribution, init.bound) == ("uniform", None)
    init = load_config(path, ["tables.0.init={distribution: uniform, bound: 0.05}"]).tables[0].init
    assert init.bound == 0.05


def test_shared_table_needs_name_and_sequence_target_must_exist(tmp_path: Path) -> None:
    doc = {**MINIMAL, "tables": [{"features": ["a", "b"], "shared": True}]}
    with pytest.raises(ConfigError, match=r"tables\[0\]: shared: true needs a table name"):
        load_config(_write(tmp_path, doc))
    doc = {
        **MINIMAL,
        "features": {**MINIMAL["features"], "sequences": [{"name": "h", "target": "nope"}]},
    }
    with pytest.raises(ConfigError, match="target 'nope' is not a sparse feature"):
        load_config(_write(tmp_path, doc))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


COLLISIONLESS = {"features": ["a"], "variant": "collisionless", "capacity": 64, "embedding_dim": 8}


def _with_table(table: dict, **sections: dict) -> dict:
    other = {"features": ["b"], "variant": "full", "embedding_dim": 8}
    return {**MINIMAL, "tables": [table, other], **sections}


def test_each_variant_parses_into_its_own_options(tmp_path: Path) -> None:
    table = load_config(_write(tmp_path, _with_table(COLLISIONLESS))).tables[0]
    assert type(table).__name__ == "CollisionlessTable" and not hasattr(table, "probes")
    saved = table.model_dump(mode="json")  # every key, the other variants' ones not among them
    assert "capacity" in saved and "attention_dim" not in saved and "probes" not in saved
    assert table_config(**saved) == table


def test_collisionless_defaults(tmp_path: Path) -> None:
    table = load_config(_write(tmp_path, _with_table(COLLISIONLESS))).tables[0]
    assert (table.capacity, table.ttl, table.policy, table.min_count) == (64, None, "evict_lru", 1)
    assert table.buckets == 4096 and table.evict_every == 3600 and table.filter_width is None


@pytest.mark.parametrize(
    ("table", "sections", "message"),
    [
        ({"capacity": None}, {}, r"tables\[0\]: .*needs capacity"),
        ({"num_embeddings": 10}, {}, "by capacity .* not num_embeddings"),
        ({"sharding": "table_wise"}, {}, "sharding 'table_wise' is not possible"),
        ({"filter_width": 1000}, {}, "filter_width must be a power of two"),
        ({"policy": "grow"}, {}, r"tables\[0\]\.policy: cannot use policy 'grow'.* capacity"),
        ({"policy": "fallback"}, {}, r"cannot use policy 'fallback': .* fixed number of rows"),
        ({"policy": "lru"}, {}, r"tables\[0\]\.policy"),
        ({"buckets": 2}, {"train": {"workers": 4}}, r"tables\[0\]\.buckets: 2 buckets"),
        ({"variant": "hash", "num_embeddings": 8}, {}, "capacity is only for variant"),
        ({"ttl": 0}, {}, r"tables\[0\]\.ttl"),
    ],
)
def test_collisionless_errors_name_the_key(
    tmp_path: Path, table: dict, sections: dict, message: str
) -> None:
    doc = _with_table({**COLLISIONLESS, **table}, **sections)
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, doc))


def test_collisionless_knobs_rejected_elsewhere(tmp_path: Path) -> None:
    doc = _with_table({"features": ["a"], "variant": "full", "embedding_dim": 8, "ttl": 60})
    with pytest.raises(ConfigError, match="ttl is only for variant 'collisionless'"):
        load_config(_write(tmp_path, doc))
