"""Secrets never leave the process that needs them: what freezelab logs, prints or
saves has the values of ``scaling.env_vars`` and the passwords inside URIs replaced.

The real values reach only the workers' environment (and the clients that connect).

>>> redact_uri("http://alice:s3cret@mlflow:5000/path")
'http://alice:***@mlflow:5000/path'
>>> redact_config({"scaling": {"env_vars": {"AWS_SECRET_ACCESS_KEY": "abc"}}})
{'scaling': {'env_vars': {'AWS_SECRET_ACCESS_KEY': '***'}}}
"""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

HIDDEN = "***"
# Config fields that may hold a URI with credentials in it.
URI_FIELDS = (("mlflow", "tracking_uri"), ("storage_path",), ("model", "weights"), ("data", "root"))
# scheme://USERINFO@host: the userinfo runs to the last "@" before the path.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s]*)@")


def _hidden(match: re.Match) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    # user:password keeps the user; a lone userinfo is a token (https://TOKEN@host).
    return f"{match['scheme']}{user}:{HIDDEN}@" if colon else f"{match['scheme']}{HIDDEN}@"


def redact_uri(uri: str | None) -> str | None:
    """``uri`` with the password of its ``user:password@`` part (or a token standing
    alone before the ``@``) hidden."""
    if not uri or "@" not in uri:
        return uri
    return _USERINFO.sub(_hidden, uri)


def strip_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """``uri`` without its ``user:password@`` part, and the (user, password) it had."""
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    bare = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return bare, (parts.username or "", parts.password or "")


def redact_text(text: str) -> str:
    """Every URI password in ``text`` hidden (for messages that quote a URI)."""
    return _USERINFO.sub(_hidden, text)


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict fit to be logged or saved: worker env var values and
    URI passwords hidden. Neither changes what a run computes."""
    safe = copy.deepcopy(config)
    scaling = safe.get("scaling")
    if isinstance(scaling, dict) and isinstance(scaling.get("env_vars"), dict):
        scaling["env_vars"] = {key: HIDDEN for key in scaling["env_vars"]}
    for path in URI_FIELDS:
        node = safe
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), str):
            node[path[-1]] = redact_uri(node[path[-1]])
    return safe
