"""The files of an image folder, local or on object storage, in torchvision's order.

One listing for both data paths: the DataLoader path reads local folders with
torchvision's ``ImageFolder``, the Ray Data path (``ray_data.py``) reads the table this
module lists, through pyarrow's filesystems (``freezelab.objectstore``). Both see the
same class folders (sorted, hidden ones skipped) and the same files in the same order
(``ImageFolder``'s: by folder, then by file name, with its image extensions), so the
seeded split picks the same images either way.

>>> layout = folder_layout("s3://bucket/pets")  # doctest: +SKIP
>>> classes, samples = image_files(layout.train)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

from freezelab import objectstore
from freezelab.errors import FreezelabError
from freezelab.redact import redact_uri


class DataError(FreezelabError, ValueError):
    """Data that cannot be built as configured: the message names the field and the path."""


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


@dataclass(frozen=True)
class FolderLayout:
    """Where the class folders are: ``train``, ``val`` (None when val is split off) and
    ``test`` (None without a ``test/`` folder)."""

    root: str
    train: str
    val: str | None
    test: str | None = None


def layout_of(root: str, folders: set[str], test_fraction: float | None) -> FolderLayout:
    """The layout of ``root`` from the names of its subfolders: ``train/`` with ``val/``,
    ``test/`` or both, or the class folders directly under ``root``. A ``test/`` folder
    is the test set: with ``data.test_fraction`` too, which one is meant is unclear.

    >>> layout_of("pets", {"train", "test"}, None).test
    'pets/test'
    """
    shown = redact_uri(root)
    has_train, has_val, has_test = ("train" in folders, "val" in folders, "test" in folders)
    if has_test and not has_train:
        raise DataError(
            f"data.root: {shown!r} has test/ but no train/; put the training images in train/ "
            "beside it"
        )
    if has_test and test_fraction is not None:
        raise DataError(
            f"data.root: {shown!r} has a test/ folder, which is the test set; remove "
            f"data.test_fraction ({test_fraction}) or the folder"
        )
    test = objectstore.join(root, "test") if has_test else None
    if has_train and (has_val or has_test):
        val = objectstore.join(root, "val") if has_val else None
        return FolderLayout(root, objectstore.join(root, "train"), val, test)
    if has_train or has_val:
        have, missing = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"data.root: {shown!r} has {have}/ but no {missing}/; give both, "
            "or put the class folders directly under root"
        )
    return FolderLayout(root, root, None)


def folder_filesystem(root: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it): a URI through ``objectstore``, a local path
    made absolute."""
    if objectstore.is_uri(root):
        return objectstore.filesystem(root, "data.root")
    import pyarrow.fs

    return pyarrow.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))


def _entries(directory: str, recursive: bool) -> list[Any]:
    """pyarrow ``FileInfo`` of everything under ``directory``, with one-line errors."""
    import pyarrow.fs

    fs, path = folder_filesystem(directory)
    try:
        return fs.get_file_info(pyarrow.fs.FileSelector(path.rstrip("/"), recursive=recursive))
    except FileNotFoundError:
        raise DataError(f"data.root: {redact_uri(directory)!r} does not exist") from None
    except OSError as err:
        raise objectstore.StorageError(
            f"data.root: {redact_uri(directory)!r}: {objectstore.reason(err)}"
        ) from None


def _why_missing(uri: str) -> str:
    """' (no such bucket)' when the URI's bucket itself is missing, else ''."""
    import pyarrow.fs

    scheme, _, rest = uri.partition("://")
    bucket = rest.split("/", 1)[0]
    if not bucket or bucket == rest.rstrip("/"):
        return ""
    found = objectstore.info(f"{scheme}://{bucket}", "data.root")
    return " (no such bucket)" if found.type == pyarrow.fs.FileType.NotFound else ""


def folder_layout(root: str, test_fraction: float | None = None) -> FolderLayout:
    """``train/`` with ``val/``, ``test/`` or both under ``root``, or the class folders
    directly under it (``layout_of``)."""
    import pyarrow.fs

    if objectstore.is_uri(root):
        found = objectstore.info(root, "data.root")
        if found.type == pyarrow.fs.FileType.NotFound:
            raise DataError(f"data.root: {redact_uri(root)!r} does not exist{_why_missing(root)}")
        if found.type != pyarrow.fs.FileType.Directory:
            raise DataError(f"data.root: {redact_uri(root)!r} is a file, not a folder")
    folders = {
        posixpath.basename(e.path.rstrip("/"))
        for e in _entries(root, recursive=False)
        if e.type == pyarrow.fs.FileType.Directory
    }
    return layout_of(root, folders, test_fraction)


def class_names(directory: str) -> list[str]:
    """The class folders of ``directory``, sorted; hidden ones (``.ipynb_checkpoints``)
    are not classes."""
    import pyarrow.fs

    names = sorted(
        name
        for e in _entries(directory, recursive=False)
        if e.type == pyarrow.fs.FileType.Directory
        and not (name := posixpath.basename(e.path.rstrip("/"))).startswith(".")
    )
    if not names:
        raise DataError(
            f"data.root: no class subfolders in {redact_uri(directory)!r} "
            "(expected one folder of images per class)"
        )
    return names


def image_files(directory: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(class names, [(file, label), ...])`` of the class folders under ``directory``,
    in ``ImageFolder``'s order. A file is a URI when ``directory`` is one."""
    import pyarrow.fs

    names = class_names(directory)
    extensions = image_extensions()
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(names):
        folder = objectstore.join(directory, name)
        _, base = folder_filesystem(folder)
        files = [
            e.path
            for e in _entries(folder, recursive=True)
            if e.type == pyarrow.fs.FileType.File and e.path.lower().endswith(extensions)
        ]
        # sorted(os.walk(...)), then sorted file names: by folder first, then by name.
        files.sort(key=lambda path: (posixpath.dirname(path), posixpath.basename(path)))
        for path in files:
            relative = posixpath.relpath(path, base.rstrip("/"))
            samples.append((objectstore.join(folder, relative), label))
    return names, samples


def check_classes(directory: str) -> None:
    """At least two class folders, each with an image file: else one line that says
    which."""
    names, samples = image_files(directory)
    shown = redact_uri(directory)
    if len(names) < 2:
        raise DataError(
            f"data.root: {shown!r} has one class folder ({names[0]!r}): a classifier needs "
            "at least 2"
        )
    present = {label for _, label in samples}
    empty = [name for label, name in enumerate(names) if label not in present]
    if empty:
        extensions = image_extensions()
        raise DataError(
            f"data.root: no image files ({', '.join(extensions[:4])}, ...) in the class "
            f"folder(s) {', '.join(map(repr, empty[:5]))} of {shown!r}"
        )
