"""One error base for everything a user can get wrong.

Every mistake in what the user asked for (a config, a policy, data, a tracking server,
a report target) raises a subclass of :class:`FreezelabError`. The CLI catches the base
once and prints one line that names what is wrong; anything else is a bug and keeps
its traceback.

>>> from freezelab.errors import FreezelabError, one_line
>>> one_line("a\\n  b")
'a; b'
"""

from __future__ import annotations

from typing import Any

# Quote at most this much of a value the user gave: a 200 KB string or an expanded
# YAML alias bomb must not become a 200 KB error message.
MAX_QUOTED = 120


class FreezelabError(Exception):
    """A user error: printed as one line, exit code 2."""

    exit_code = 2


def one_line(text: str) -> str:
    """``text``'s lines joined with ``; ``: messages built from several findings."""
    parts = [part.strip() for part in str(text).splitlines()]
    head, *rest = [p for p in parts if p] or [""]
    if head.endswith(":") and rest:
        return head + " " + "; ".join(rest)
    return "; ".join([head, *rest])


def quote(value: Any, limit: int = MAX_QUOTED) -> str:
    """``repr(value)``, cut to ``limit`` characters; never expands a huge structure."""
    if isinstance(value, (dict, list, tuple)) and _size_over(value, limit):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size_over(value: Any, limit: int) -> bool:
    # Counts nodes without building a string: an alias bomb has billions of them.
    budget = limit
    stack = [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return False


def describe_validation_error(origin: str, err: Any, what: str = "invalid config") -> str:
    """One line for a pydantic ``ValidationError``: every field, what is wrong, and a
    bounded quote of the value, e.g. ``train.yaml: invalid config: epochs: missing``."""
    findings = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            findings.append(f"{field}: unknown field")
        elif e["type"] == "missing":
            findings.append(f"{field}: missing")
        else:
            message = e["msg"].removeprefix("Value error, ")
            # A mapping's own validator names what is wrong inside it: no need to
            # quote the whole mapping.
            shown = "" if isinstance(value, (dict, list)) else f" (got {quote(value)})"
            findings.append(f"{field}: {message}{shown}" if field else f"{message}{shown}")
    prefix = f"{origin}: {what}" if origin else what
    return f"{prefix}: " + "; ".join(findings)


class ConfigError(FreezelabError, ValueError):
    """A config that cannot run: the message names the field and the value."""


class NotFound(FreezelabError, LookupError):
    """Something the user named (an experiment, a run, a sweep) does not exist."""
