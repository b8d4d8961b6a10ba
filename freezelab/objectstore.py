"""Object storage (``s3://``, ``gs://``, anything pyarrow's filesystems read) behind
one small face: is a path a URI, which filesystem reads it, and does it exist.

pyarrow's filesystems are the ones Ray Train and Ray Data use for the same URIs, so
what this module can read, they can. Credentials and endpoints come from the
environment as the cloud SDKs read them (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...); nothing here logs them.

>>> is_uri("s3://bucket/images"), is_uri("/data/images"), is_uri("relative/path")
(True, False, False)
>>> join("s3://bucket/runs/", "a", "b.json")
's3://bucket/runs/a/b.json'
"""

from __future__ import annotations

import re
from typing import Any

from freezelab.errors import FreezelabError
from freezelab.redact import redact_text, redact_uri


class StorageError(FreezelabError, OSError):
    """Storage that cannot be used as asked: the message names the URI and why."""


def is_uri(path: str) -> bool:
    """True for a URI (``s3://``, ``gs://``, ``file://``, ...), False for a local path."""
    return "://" in str(path)


def join(uri: str, *parts: str) -> str:
    """``uri`` and ``parts`` joined by single slashes (a local path works too)."""
    return "/".join([str(uri).rstrip("/"), *(str(p).strip("/") for p in parts)])


def filesystem(uri: str, what: str = "storage") -> tuple[Any, str]:
    """``(pyarrow filesystem, path within it)`` for ``uri``; a one-line
    :class:`StorageError` for a scheme or a URI that pyarrow cannot open."""
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError) as err:
        raise StorageError(f"{what}: {redact_uri(uri)!r} cannot be opened: {reason(err)}") from None


def info(uri: str, what: str = "storage") -> Any:
    """pyarrow's ``FileInfo`` of ``uri`` (its type is ``NotFound`` when nothing is
    there); a one-line :class:`StorageError` when the store cannot be asked."""
    fs, path = filesystem(uri, what)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"{what}: {redact_uri(uri)!r}: {reason(err)}") from None


def require_directory(uri: str, what: str = "storage") -> None:
    """Raise :class:`StorageError` unless ``uri`` is a directory (a prefix that holds
    objects, on an object store) that this process can list."""
    import pyarrow.fs

    found = info(uri, what)
    if found.type == pyarrow.fs.FileType.NotFound:
        raise StorageError(f"{what}: {redact_uri(uri)!r} does not exist")
    if found.type != pyarrow.fs.FileType.Directory:
        raise StorageError(f"{what}: {redact_uri(uri)!r} is a file, not a folder")


def reason(err: BaseException) -> str:
    """The part of a pyarrow/AWS SDK error that says why, in a few words: access
    denied, no such bucket, an endpoint that does not answer, or the first line."""
    text = str(err)
    checks = (
        (r"ACCESS_DENIED|AccessDenied|Forbidden|HTTP response code: 403", "access denied"),
        (r"NoSuchBucket|NO_SUCH_BUCKET", "no such bucket"),
        (
            r"NETWORK_CONNECTION|curlCode: (6|7|28)|Could not resolve|Couldn't connect|"
            r"Connection refused|timed out",
            "the object store did not answer (endpoint unreachable)",
        ),
        (r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SignatureDoesNotMatch", "invalid credentials"),
    )
    for pattern, said in checks:
        if re.search(pattern, text):
            return said
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return redact_text(first)[:200]
