"""All-or-nothing output folders that never lose the user's own files.

Every export is first written into a private staging folder *inside* the destination folder
(same file system, so the final moves are renames that need no disk space), then moved into
place file by file with ``os.replace``, which swaps a file atomically: at every instant each
destination holds either the previous result or the new one, never nothing. The previous
versions are kept as hard links until the whole set is in place, so a failure (full disk,
permissions, Ctrl+C, SIGTERM) puts the previous results back; a destination folder this call
created (with any parents) is removed again.

Ownership: ``.ctlanguage-files.json`` in the destination lists the files the last export wrote
there. Only those are ever replaced or removed; any other file in the way stops the export with
a clear error before anything is moved.

A process killed outright (SIGKILL, power cut) cannot clean up: the next export into the same
folder (or ``recover``) finishes an interrupted move — the staging folder holds a journal once
every file is staged — or deletes a staging folder whose writing had not finished.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..errors import ExportError

STAGING_PREFIX = ".ctlanguage-staging-"
MANIFEST = ".ctlanguage-files.json"     # in the destination: what our last export wrote there
_OWNER = ".owner.json"                  # in a staging folder: {"pid", "host"} of the writer
_JOURNAL = ".commit.json"               # in a staging folder: every file is staged; move them
_BACKUP = ".replaced"                   # in a staging folder: previous versions (hard links)
_INTERNAL = (_OWNER, _JOURNAL, _BACKUP)
_OWNERLESS_GRACE_S = 60.0               # an owner-less staging folder younger than this is in use
# what exports of versions without a manifest wrote (recognised next to their findings.json)
_LEGACY_NAMES = ("findings.json", "findings.csv", "report.html", "segmentation.seg.nrrd",
                 "segmentation.dcm")


def _describe_oserror(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "the disk is full (no space left on device)"
    if exc.errno == errno.EDQUOT:
        return "the disk quota is exceeded"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied"
    return exc.strerror or str(exc)


def check_writable_dir(out_dir: str | os.PathLike, *, create: bool = True) -> list[Path]:
    """The project's one check that a folder accepts new files (ExportError, one sentence, if not).

    ``create=True``: make the folder (with parents) when missing; returns the folders this call
    created, deepest first (empty when it existed), for ``remove_created`` -- no folder is left
    behind on failure. ``create=False``: nothing is made; a missing folder is an error."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"output folder {out_dir} is not writable: a file with that name exists")
    if not out_dir.exists() and not create:
        raise ExportError(f"output folder {out_dir} does not exist")
    created: list[Path] = []
    probe = out_dir.absolute()
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_created(created)
        raise ExportError(
            f"output folder {out_dir} is not writable: {_describe_oserror(exc)}"
        ) from None
    # os.access is not enough (root, ACLs, read-only mounts): try to create a file.
    try:
        fd, probe_file = tempfile.mkstemp(prefix=".ctlanguage-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe_file)
    except OSError as exc:
        remove_created(created)
        raise ExportError(
            f"output folder {out_dir} is not writable: {_describe_oserror(exc)}"
        ) from None
    return created


def remove_created(created: list[Path]) -> None:
    """Remove folders made by ``check_writable_dir`` again, deepest first, if they are empty."""
    for d in created:
        with contextlib.suppress(OSError):
            d.rmdir()


# ------------------------------------------------------------------------ ownership and recovery

def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate the process on Windows
        import ctypes

        k32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = k32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = k32.GetExitCodeProcess(handle, ctypes.byref(code))
        k32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_alive(staging: Path) -> bool:
    try:
        owner = json.loads((staging / _OWNER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            return time.time() - staging.stat().st_mtime < _OWNERLESS_GRACE_S
        return False
    if owner.get("host") != socket.gethostname():
        return True  # another machine's export on a shared folder: cannot tell, leave it
    return _pid_alive(int(owner.get("pid", -1)))


def _read_manifest(out_dir: Path) -> set[str] | None:
    try:
        doc = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))
        return {str(p) for p in doc["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _legacy_outputs(out_dir: Path) -> set[str]:
    """Files an export of a version without a manifest wrote (recognised by its findings.json)."""
    try:
        doc = json.loads((out_dir / "findings.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(doc, dict) or (doc.get("software") or {}).get("name") != "ctlanguage":
        return set()
    ours = {n for n in _LEGACY_NAMES if (out_dir / n).is_file()}
    for f in doc.get("findings") or []:
        rel = f.get("mask") if isinstance(f, dict) else None
        if isinstance(rel, str) and rel.startswith("masks/") and "/" not in rel[6:]:
            ours.add(rel)
    return ours


def check_ours(out_dir: str | os.PathLike, rel_paths) -> None:
    """Raise ExportError when a file we would write into ``out_dir`` exists and is not ours.

    ``_commit`` checks every staged file; commands call this first for the names they know
    (findings.json, report.html, …) so that the user is told before minutes of work."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    ours = _read_manifest(out_dir)
    if ours is None:
        ours = _legacy_outputs(out_dir)
    for rel in rel_paths:
        dest = out_dir / rel
        if dest.is_dir() and not dest.is_symlink():
            raise ExportError(f"cannot write {dest}: a folder with that name is in the way; "
                              "nothing was written")
        if (dest.exists() or dest.is_symlink()) and rel not in ours:
            raise ExportError(f"{dest} exists and was not written by ctlanguage; choose another "
                              "output folder or move that file away (nothing was written)")


def _write_manifest(out_dir: Path, files: list[str]) -> None:
    data = json.dumps({"written_by": "ctlanguage", "files": sorted(files)}, indent=1) + "\n"
    atomic_write_bytes(out_dir / MANIFEST, data.encode("utf-8"))


def _staged_files(staging: Path) -> list[str]:
    out = []
    for p in staging.rglob("*"):
        rel = p.relative_to(staging)
        if rel.parts[0] in _INTERNAL or p.is_dir():
            continue
        out.append(rel.as_posix())
    return sorted(out)


def recover(out_dir: str | os.PathLike) -> int:
    """Finish or discard exports into ``out_dir`` whose process died; returns how many.

    A staging folder with a journal had every file written: its move is completed. One without
    was interrupted while writing: it is deleted. Folders of live processes are left alone."""
    out_dir = Path(out_dir)
    n = 0
    with contextlib.suppress(OSError):
        stale = [d for d in out_dir.iterdir()
                 if d.name.startswith(STAGING_PREFIX) and d.is_dir() and not _owner_alive(d)]
        for d in stale:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                journal = json.loads((d / _JOURNAL).read_text(encoding="utf-8"))
                for rel in journal["new"]:
                    src, dest = d / rel, out_dir / rel
                    if src.is_file():
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(src, dest)
                for rel in journal["stale"]:
                    with contextlib.suppress(FileNotFoundError):
                        (out_dir / rel).unlink()
                _write_manifest(out_dir, journal["new"])
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


# ------------------------------------------------------------------------------- the context

@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Context manager yielding a staging folder; its files are moved into ``out_dir`` on success.

    ``with atomic_output_dir(d) as tmp: write(tmp / "a.json")`` leaves ``d/a.json`` or nothing.
    Staged files replace same-named files of an earlier export; files of the earlier export that
    the new one does not write are removed; nothing else in ``out_dir`` is touched. Any OSError
    inside the block becomes an ExportError naming the folder and the cause.
    """
    out_dir = Path(out_dir)
    created = check_writable_dir(out_dir)
    recover(out_dir)
    try:
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        (staging / _OWNER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                      encoding="utf-8")
    except OSError as exc:
        with contextlib.suppress(NameError):
            shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        raise ExportError(f"could not write to {out_dir}: {_describe_oserror(exc)}") from None
    try:
        yield staging
        _commit(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        remove_created(created)
        if isinstance(exc, OSError):
            raise ExportError(
                f"could not write the exports to {out_dir}: {_describe_oserror(exc)}; "
                "nothing was written"
            ) from None
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out_dir: Path) -> None:
    """Move staged files into place; on any failure put the previous files back."""
    new = _staged_files(staging)
    check_ours(out_dir, new)
    ours = _read_manifest(out_dir)
    if ours is None:
        ours = _legacy_outputs(out_dir)
    new_set = set(new)
    stale = sorted(rel for rel in ours if rel not in new_set and (out_dir / rel).is_file())
    atomic_write_bytes(staging / _JOURNAL, json.dumps({"new": new, "stale": stale}).encode("utf-8"))
    backup = staging / _BACKUP
    moved: list[tuple[Path, Path | None]] = []   # (destination, its previous version)
    made: list[Path] = []                        # sub-folders of out_dir created here
    try:
        for rel in new:
            src, dest = staging / rel, out_dir / rel
            for parent in reversed(dest.relative_to(out_dir).parents[:-1]):
                d = out_dir / parent
                if not d.is_dir():
                    d.mkdir()
                    made.append(d)
            old = None
            if dest.exists() or dest.is_symlink():
                old = backup / rel
                old.parent.mkdir(parents=True, exist_ok=True)
                _keep_copy(dest, old)
            os.replace(src, dest)
            moved.append((dest, old))
        for rel in stale:
            dest, old = out_dir / rel, backup / rel
            old.parent.mkdir(parents=True, exist_ok=True)
            os.replace(dest, old)
            moved.append((dest, old))
        _write_manifest(out_dir, new)
    except BaseException:
        for dest, old in reversed(moved):
            with contextlib.suppress(OSError):
                if old is not None:
                    os.replace(old, dest)
                else:
                    dest.unlink()
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise


def _keep_copy(src: Path, dst: Path) -> None:
    """A hard link when the file system allows it (no space, instant), else a copy."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write one file atomically (``ctlanguage.io.atomic_write``: temp file + rename, usual mode)."""
    from ..io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
