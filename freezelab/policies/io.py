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

from freezelab.policies.base import FreezePolicy, PolicyError, from_dict


def load_policy(source: str | Path | dict[str, Any]) -> FreezePolicy:
    """A policy from a dict, a JSON or YAML file, or inline JSON/YAML text.

    A file may hold the policy itself or a train config with a ``policy:`` key.
    """
    if isinstance(source, dict):
        return from_dict(source)
    text = str(source)
    path = Path(text)
    looks_inline = text.lstrip().startswith("{") or "\n" in text or ":" in text and not path.suffix
    if not looks_inline:
        if not path.exists():
            raise PolicyError(f"policy file {text!r} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise PolicyError(f"cannot parse policy {source!s}: {err}") from None
    if isinstance(data, dict) and "policy" in data and "type" not in data:
        data = data["policy"]
    return from_dict(data)


def dump_policy(policy: FreezePolicy, fmt: str = "json") -> str:
    data = policy.to_dict()
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=True)
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=True)
    raise ValueError(f"format must be 'json' or 'yaml', got {fmt!r}")
