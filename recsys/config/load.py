"""Reading an experiment: YAML, `key=value` overrides, validation errors that name the file
and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from recsys.config.base import ConfigError
from recsys.config.experiment import ExperimentConfig
from recsys.config.table_init import INIT_DISTRIBUTIONS
from recsys.config.tables import VARIANTS

# The members of a union that pydantic names in an error's location, after the union's key.
_UNION_TAGS = {
    "synthetic": ("ctr", "sequence"),
    "tables[i]": VARIANTS,
    "init": INIT_DISTRIBUTIONS,
}


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
        loc, previous = "", None
        for part in e["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            elif part in _UNION_TAGS.get(previous, ()):
                pass  # which member of a union was tried: the key path says enough
            else:
                loc += f".{part}" if loc else str(part)
            previous = "tables[i]" if isinstance(part, int) else part
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "union_tag_invalid" and e["ctx"].get("tag") is not None:
            # A table's variant, told apart by a function: say it as a Literal would.
            *others, last = (repr(v) for v in VARIANTS)
            loc += ".variant"
            msg = f"Input should be {', '.join(others)} or {last} (got {e['ctx']['tag']!r})"
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
