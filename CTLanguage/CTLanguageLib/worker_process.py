"""The encoder worker process: the line protocol it speaks on stdout, how it is started
(interpreter, environment) and a non-blocking ``subprocess`` wrapper.

Protocol (one line each, written by ``encode_worker.py``, read by ``background.EncodingJob``)::

    CTLANGUAGE_PROGRESS <fraction> <message>
    CTLANGUAGE_DONE <path of the saved encoding>
    CTLANGUAGE_ERROR <one-sentence message>

Cancel: the job creates the file given as ``--cancel-file``; the worker's ``cancel()`` callback
sees it and stops with ``CancelledError`` (the job kills the process after a grace period).
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

PROGRESS_TAG = "CTLANGUAGE_PROGRESS"
DONE_TAG = "CTLANGUAGE_DONE"
ERROR_TAG = "CTLANGUAGE_ERROR"
CANCEL_FILE = "CANCEL"
CANCELLED_MESSAGE = "cancelled by the user"

WORKER_SCRIPT = Path(__file__).resolve().with_name("encode_worker.py")


def format_line(tag: str, text: str) -> str:
    return f"{tag} {str(text).replace(chr(10), ' ')}"


def format_progress(fraction: float, message: str = "") -> str:
    return format_line(PROGRESS_TAG, f"{float(fraction):.4f} {message}")


def parse_line(line: str):
    """One worker line -> ``("progress", (fraction, message))`` | ``("done", path)`` |
    ``("error", message)`` | ``("log", line)`` | ``None`` (blank or malformed progress)."""
    if line.startswith(PROGRESS_TAG):
        parts = line.split(" ", 2)
        try:
            fraction = float(parts[1])
        except (IndexError, ValueError):
            return None
        return "progress", (min(max(fraction, 0.0), 1.0), parts[2] if len(parts) > 2 else "")
    if line.startswith(DONE_TAG):
        return "done", line[len(DONE_TAG):].strip()
    if line.startswith(ERROR_TAG):
        return "error", line[len(ERROR_TAG):].strip()
    return ("log", line) if line.strip() else None


class SubprocessProcess:
    """Process object used by default: ``subprocess.Popen`` plus a reader thread that queues
    stdout lines, so :meth:`read_lines` never blocks (works inside Slicer and under pytest).

    Interface expected by :class:`EncodingJob` (a fake for tests implements the same):
    ``start(argv, env)``, ``read_lines() -> list[str]``, ``returncode() -> int | None``,
    ``kill()``, ``wait(timeout)``.
    """

    def __init__(self):
        self._popen: subprocess.Popen | None = None
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self, argv: list[str], env: dict | None = None) -> None:
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = getattr(subprocess, "CREATE_NO_WINDOW", 0)
        self._popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, text=True, encoding="utf-8", errors="replace", bufsize=1, **kwargs,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        for line in self._popen.stdout:
            self._lines.put(line.rstrip("\r\n"))
        self._popen.stdout.close()

    def read_lines(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self._lines.get_nowait())
            except queue.Empty:
                return out

    def returncode(self):
        if self._popen is None:
            return None
        rc = self._popen.poll()
        if rc is not None and self._reader is not None:
            self._reader.join(timeout=2.0)  # make sure every line has been queued
        return rc

    def kill(self) -> None:
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()

    def wait(self, timeout: float | None = None):
        if self._popen is None:
            return None
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def python_executable() -> str:
    """``PythonSlicer`` inside the Slicer application (a plain Python with Slicer's packages),
    else the current interpreter."""
    try:
        import slicer  # noqa: F401

        if getattr(slicer, "app", None) is not None:
            found = shutil.which("PythonSlicer")
            if found:
                return found
    except ImportError:
        pass
    return sys.executable


def worker_env() -> dict:
    """The worker's environment: this one, with the module folder (which holds ``ctlanguage`` and
    ``CTLanguageLib``) first on ``PYTHONPATH`` and unbuffered output."""
    env = dict(os.environ)
    module_dir = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([module_dir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
