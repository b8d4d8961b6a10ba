"""Reading the files a user writes: YAML mappings and inline YAML/JSON.

One loader for train configs, sweep files, studies and policy files, so they fail
the same way: ``yaml.safe_load`` (YAML never runs code), and an error that names the
file and what is wrong with it.

>>> parse_yaml("{type: full}", "--policy")
{'type': 'full'}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

from freezelab.errors import ConfigError

# Configs are a few KB; a larger file is almost certainly not one.
MAX_CONFIG_BYTES = 1 << 20


def read_text(path: str | Path, what: str = "a config") -> str:
    """The text of a config file, or a ConfigError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a directory, not {what} file")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{str(path)!r} has {size:,} bytes: too large for {what}")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{str(path)!r} is not a text file: expected {what} in YAML") from None
    except OSError as err:
        raise ConfigError(f"cannot read {str(path)!r}: {err.strerror or err}") from None


# A config's values, counted as if every YAML alias were copied out: an "alias bomb"
# of a few hundred bytes expands to billions of them.
MAX_EXPANDED_VALUES = 100_000


def parse_yaml(text: str, origin: str) -> Any:
    """``yaml.safe_load`` with an error that names where the text came from."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply to be a config") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{origin}: not valid YAML{at}: {problem}") from None
    try:
        size = _expanded_size(data, {})
    except RecursionError:
        raise ConfigError(f"{origin}: nested too deeply to be a config") from None
    if size > MAX_EXPANDED_VALUES:
        raise ConfigError(
            f"{origin}: expands to more than {MAX_EXPANDED_VALUES:,} values through YAML "
            "aliases (&anchor/*alias); a config is far smaller"
        )
    return data


def _expanded_size(value: Any, seen: dict[int, int]) -> int:
    # Shared nodes are counted once per reference, each computed once: linear in the
    # parsed graph however large its expansion.
    if not isinstance(value, (dict, list)):
        return 1
    key = id(value)
    if key not in seen:
        seen[key] = 0  # a self-referencing alias counts as one value
        children = value.values() if isinstance(value, dict) else value
        seen[key] = 1 + sum(_expanded_size(child, seen) for child in children)
    return seen[key]


def read_mapping(path: str | Path, what: str = "a config") -> dict[str, Any]:
    """The YAML mapping in ``path``, or a ConfigError that names the file."""
    data = parse_yaml(read_text(path, what), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what} is a mapping, got {type(data).__name__}")
    return data


class ConfigModel(BaseModel):
    """Base of every config section: frozen, no unknown fields, no ``inf``/``nan``, and
    no boolean where a number is expected (pydantic would read ``n: true`` as 1)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if (
                    isinstance(value, bool)
                    and field is not None
                    and _wants_number(field.annotation)
                ):
                    raise ValueError(f"{name}: expected a number, got {value!r}")
        return data


def config_kind(path: str | Path) -> Literal["train", "sweep"]:
    """``sweep`` for a sweep file (it has a ``space``), ``train`` for a train config."""
    return "sweep" if "space" in read_mapping(path) else "train"


def _wants_number(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    args = get_args(annotation)
    return bool(args) and bool not in args and any(a in (int, float) for a in args)
