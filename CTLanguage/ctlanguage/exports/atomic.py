"""All-or-nothing output folders.

Every export is first written into a private staging folder *inside* the destination folder
(same file system, so the final moves are renames that need no disk space), then moved into
place. If anything fails — a full disk, a permission problem, a bug — the staging folder is
removed, files that were being replaced are restored, and a destination folder that this call
created is removed again: the user never finds half an export.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import ExportError

STAGING_PREFIX = ".ctlanguage-staging-"


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return exc.strerror or str(exc)


def check_writable_dir(out_dir: str | os.PathLike, *, create: bool = True) -> bool:
    """The project's one check that a folder accepts new files (ExportError, one sentence, if not).

    ``create=True``: make the folder (with parents) when missing; returns True when this call
    created it. ``create=False``: nothing is made; a missing folder is an error."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output folder {out_dir} is not writable: a file with that name exists")
    created = not out_dir.exists()
    if created and not create:
        raise ExportError(f"output folder {out_dir} does not exist")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"output folder {out_dir} is not writable: {_describe_oserror(exc)}"
        ) from None
    # os.access is not enough (root, ACLs, read-only mounts): try to create a file.
    try:
        fd, probe = tempfile.mkstemp(prefix=".ctlanguage-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if created:
            _remove_created(out_dir)
        raise ExportError(
            f"output folder {out_dir} is not writable: {_describe_oserror(exc)}"
        ) from None
    return created


def _remove_created(out_dir: Path) -> None:
    with contextlib.suppress(OSError):
        out_dir.rmdir()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a staging folder; its content is moved into ``out_dir`` on success.

    ``with atomic_output_dir(d) as tmp: write(tmp / "a.json")`` leaves ``d/a.json`` or nothing.
    Entries of the staging folder replace same-named entries of ``out_dir`` (files or folders).
    Any OSError inside the block is turned into an ExportError naming the folder and the cause.
    """
    out_dir = Path(out_dir)
    created = check_writable_dir(out_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    except OSError as exc:
        if created:
            _remove_created(out_dir)
        raise ExportError(f"could not write to {out_dir}: {_describe_oserror(exc)}") from None
    try:
        yield staging
        _commit(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            _remove_created(out_dir)
        if isinstance(exc, OSError):
            raise ExportError(
                f"could not write the exports to {out_dir}: {_describe_oserror(exc)}; "
                "nothing was written"
            ) from None
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out_dir: Path) -> None:
    """Move staged entries into place; on failure undo the moves already done."""
    backup = staging / ".replaced"
    entries = sorted(p for p in staging.iterdir() if p.name != ".replaced")
    moved: list[tuple[Path, Path | None]] = []  # (destination, backup of the old one)
    try:
        for src in entries:
            dest = out_dir / src.name
            old = None
            if dest.exists() or dest.is_symlink():
                backup.mkdir(exist_ok=True)
                old = backup / src.name
                os.replace(dest, old)
            moved.append((dest, old))
            os.replace(src, dest)
    except BaseException:
        for dest, old in reversed(moved):
            with contextlib.suppress(OSError):
                if dest.is_dir() and not dest.is_symlink():
                    shutil.rmtree(dest)
                elif dest.exists() or dest.is_symlink():
                    dest.unlink()
            if old is not None:
                with contextlib.suppress(OSError):
                    os.replace(old, dest)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file atomically (``ctlanguage.io.atomic_write``: temp file + rename)."""
    from ..io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
