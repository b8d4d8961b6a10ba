"""Read and write policies as JSON or YAML (files or inline text).

>>> from freezelab.policies import load_policy
>>> load_policy('{"type": "last_n", "n": 3, "unit": "layer"}').n
3
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from freezelab.config_io import parse_yaml, read_text
from freezelab.errors import ConfigError
from freezelab.policies.base import FreezePolicy, PolicyError, from_dict


def load_policy(source: str | Path | dict[str, Any]) -> FreezePolicy:
    """A policy from a dict, a JSON or YAML file, or inline JSON/YAML text.

    A file may hold the policy itself or a train config with a ``policy:`` key.
    """
    if isinstance(source, dict):
        return from_dict(source)
    text = str(source)
    path = Path(text)
    origin = "--policy"
    if "\n" not in text and len(text) < 4096 and path.exists():
        try:
            text, origin = read_text(path, "a policy"), str(path)
        except ConfigError as err:
            raise PolicyError(str(err)) from None
    try:
        data = parse_yaml(text, origin)  # JSON is YAML too
    except ConfigError as err:
        raise PolicyError(str(err)) from None
    if isinstance(data, str) and origin == "--policy":
        raise PolicyError(f"policy file {text!r} does not exist")
    if isinstance(data, dict) and "policy" in data and "type" not in data:
        data = data["policy"]
    if not isinstance(data, dict):
        raise PolicyError(
            f"{origin}: not a policy: expected a mapping with a 'type' key (or a policy file), "
            f"got {type(data).__name__}"
        )
    return from_dict(data)


def dump_policy(policy: FreezePolicy, fmt: str = "json") -> str:
    data = policy.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=True)
    raise ValueError(f"format must be 'json' or 'yaml', got {fmt!r}")
