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

Small files and folders of files on a URI (or an absolute local path, through the
same calls): ``read_text``, ``write_text``, ``exists``, ``list_files``, ``copy_tree``
(upload, download or copy), ``delete``. Object stores have no folders: a folder is
the prefix of its objects, and it exists while it holds one.
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
    import os

    import pyarrow.fs

    if not is_uri(uri):
        uri = os.path.abspath(uri)  # pyarrow opens local paths only when absolute
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


def require_writable(uri: str, what: str = "storage") -> None:
    """Raise a one-line :class:`StorageError` unless this process can write under
    ``uri``: its bucket must exist, and a probe object is written there and deleted.

    On failure nothing is left. On success at most the (empty) folder ``uri`` is: an
    object store keeps a folder that its last delete would empty as a marker object,
    and this folder is the one the caller is about to write into.
    """
    import uuid

    fs, path = filesystem(uri, what)
    if fs.type_name in ("s3", "gcs"):  # a bucket first: "no such bucket" says more
        bucket = path.split("/", 1)[0]
        try:
            found = fs.get_file_info(bucket)
        except OSError as err:
            raise StorageError(f"{what}: {redact_uri(uri)!r}: {reason(err)}") from None
        if found.type == _file_type().NotFound:
            raise StorageError(f"{what}: {redact_uri(uri)!r}: no such bucket {bucket!r}")
    probe = f"{path.rstrip('/')}/.freezelab-probe-{uuid.uuid4().hex}"
    try:
        if fs.type_name not in ("s3", "gcs"):
            fs.create_dir(path, recursive=True)  # file://: the folder the run makes anyway
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as err:
        raise StorageError(
            f"{what}: {redact_uri(uri)!r}: cannot write there: {reason(err)}"
        ) from None


def read_text(uri: str) -> str:
    """The text of the file at ``uri``; FileNotFoundError when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != _file_type().File:
        raise FileNotFoundError(f"{redact_uri(uri)} does not exist")
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to the file at ``uri`` (replacing it; a local folder is created)."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(text.encode("utf-8"))


def exists(uri: str) -> bool:
    """True when ``uri`` is a file, or a folder (a prefix that holds objects)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != _file_type().NotFound


def list_files(uri: str) -> list[str]:
    """The files under the folder ``uri`` (recursively), as URIs of the same scheme;
    empty when there is no such folder."""
    import pyarrow.fs

    fs, root = filesystem(uri)
    if fs.get_file_info(root).type != _file_type().Directory:
        return []
    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    base = uri.rstrip("/")
    root = root.rstrip("/")
    return sorted(base + item.path[len(root) :] for item in found if item.type == _file_type().File)


def copy_tree(source: str, destination: str) -> None:
    """Copy the folder ``source`` (with everything under it) to ``destination``: an
    upload, a download, or a copy within one store (object by object)."""
    import pyarrow.fs

    source_fs, source_path = filesystem(source)
    destination_fs, destination_path = filesystem(destination)
    pyarrow.fs.copy_files(
        source_path,
        destination_path,
        source_filesystem=source_fs,
        destination_filesystem=destination_fs,
        use_threads=True,
    )


def delete(uri: str) -> None:
    """Delete the file or the folder (with everything under it) at ``uri``, if any."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == _file_type().Directory:
        fs.delete_dir(path)
    elif kind == _file_type().File:
        fs.delete_file(path)


def _file_type() -> Any:
    import pyarrow.fs

    return pyarrow.fs.FileType


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
