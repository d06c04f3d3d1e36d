"""Encoding in a separate process, with progress and cancel.

The Slicer GUI never runs the image encoder itself: :class:`EncodingJob` writes the volume to a
private work folder, starts ``encode_worker.py`` in a separate Python process (``PythonSlicer``
inside Slicer, ``sys.executable`` elsewhere), and reads its progress lines. Inside Slicer a
``qt.QTimer`` calls :meth:`EncodingJob.poll` (see :func:`start_qt_polling`), so the GUI stays
responsive; scripted and batch use passes ``waitForCompletion=True``.

Testability (the SlicerNNUnet pattern): the process object is injectable (``process_factory``)
and the signals are a pure-Python :class:`Signal`, so the whole state machine runs under pytest
without Qt.

Worker protocol (one line each on the worker's stdout)::

    CTLANGUAGE_PROGRESS <fraction> <message>
    CTLANGUAGE_DONE <path of the saved encoding>
    CTLANGUAGE_ERROR <one-sentence message>

Cancel: the job creates ``<work>/CANCEL`` (the worker's ``cancel()`` callback sees it and stops
with ``CancelledError``), waits briefly, then kills the process. Nothing is written to the MRML
scene by this module; a cancelled or failed job only deletes its own work folder.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PROGRESS_TAG = "CTLANGUAGE_PROGRESS"
DONE_TAG = "CTLANGUAGE_DONE"
ERROR_TAG = "CTLANGUAGE_ERROR"
CANCEL_FILE = "CANCEL"

WORKER_SCRIPT = Path(__file__).resolve().with_name("encode_worker.py")


class Signal:
    """A minimal pure-Python signal: ``connect(callable)``, ``disconnect(callable)``, ``emit(*args)``."""

    def __init__(self, name: str = ""):
        self.name = name
        self._slots: list = []

    def connect(self, slot) -> None:
        if slot not in self._slots:
            self._slots.append(slot)

    def disconnect(self, slot=None) -> None:
        if slot is None:
            self._slots.clear()
        elif slot in self._slots:
            self._slots.remove(slot)

    def emit(self, *args) -> None:
        for slot in list(self._slots):
            slot(*args)


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


def _engine_search_path() -> str:
    """Folder that holds the ``ctlanguage`` package (the module folder), for the worker."""
    return str(Path(__file__).resolve().parent.parent)


class EncodingJob:
    """Encode one volume with one model in a separate process.

    States: ``idle`` -> ``running`` -> ``finished`` | ``failed`` | ``cancelled``.
    Signals: ``progress(fraction, message)``, ``finished(encoding_path)``, ``failed(message)``,
    ``cancelled()``; exactly one of the last three is emitted once.
    """

    def __init__(self, volume, model: str = "default", device: str | None = None,
                 work_dir: str | os.PathLike | None = None, process_factory=SubprocessProcess,
                 python: str | None = None, worker_script: str | os.PathLike | None = None,
                 cancel_grace_s: float = 2.0):
        self.volume = volume
        self.model = str(model or "default")
        self.device = device if device not in ("", "auto") else None
        self._work_dir_given = work_dir is not None
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.process_factory = process_factory
        self.python = python or python_executable()
        self.worker_script = Path(worker_script) if worker_script else WORKER_SCRIPT
        self.cancel_grace_s = cancel_grace_s
        self.state = "idle"
        self.fraction = 0.0
        self.message = ""
        self.error: str | None = None
        self.result_path: str | None = None
        self.log: list[str] = []
        self.process = None
        self._cancel_requested_at: float | None = None
        self.progress = Signal("progress")
        self.finished = Signal("finished")
        self.failed = Signal("failed")
        self.cancelled = Signal("cancelled")

    # -- control -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state == "running"

    def start(self, waitForCompletion: bool = False, poll_interval_s: float = 0.1,
              timeout_s: float | None = None) -> "EncodingJob":
        if self.state != "idle":
            raise ValueError("This encoding job was already started.")
        if self.volume is None:
            raise ValueError("No volume to encode.")
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="ctlanguage-encode-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._write_input()
        argv = [
            self.python, str(self.worker_script),
            "--input", str(self.work_dir / "volume.npy"),
            "--geometry", str(self.work_dir / "geometry.json"),
            "--model", self.model,
            "--output", str(self.work_dir / "encoding.safetensors"),
            "--cancel-file", str(self.work_dir / CANCEL_FILE),
        ]
        if self.device:
            argv += ["--device", self.device]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_engine_search_path()] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = self.process_factory()
        self.state = "running"
        self.progress.emit(0.0, "Starting the encoder process…")
        self.process.start(argv, env)
        if waitForCompletion:
            self.wait(poll_interval_s=poll_interval_s, timeout_s=timeout_s)
        return self

    def wait(self, poll_interval_s: float = 0.1, timeout_s: float | None = None) -> str:
        """Block until the job ends. Returns the state; raises ValueError when it failed."""
        t0 = time.monotonic()
        while self.poll():
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                self.cancel()
                while self.poll():
                    time.sleep(poll_interval_s)
                raise ValueError(f"Encoding did not finish within {timeout_s:.0f} s and was cancelled.")
            time.sleep(poll_interval_s)
        if self.state == "failed":
            raise ValueError(self.error or "Encoding failed.")
        return self.state

    def cancel(self) -> None:
        """Ask the worker to stop (cancel file), kill it after a grace period (done in poll)."""
        if self.state != "running":
            return
        self._cancel_requested_at = time.monotonic()
        try:
            (self.work_dir / CANCEL_FILE).write_text("cancel\n")
        except OSError:
            self.process.kill()

    def poll(self) -> bool:
        """Process pending output; returns True while the job is still running."""
        if self.state != "running":
            return False
        for line in self.process.read_lines():
            self._handle_line(line)
        if self.state != "running":
            return False
        rc = self.process.returncode()
        if rc is None:
            if (self._cancel_requested_at is not None
                    and time.monotonic() - self._cancel_requested_at > self.cancel_grace_s):
                self.process.kill()
            return True
        for line in self.process.read_lines():  # lines that arrived just before exit
            self._handle_line(line)
        if self.state == "running":
            if self._cancel_requested_at is not None:
                self._end_cancelled()
            elif self.result_path is not None and rc == 0:
                self._end_finished()
            else:
                tail = " | ".join(self.log[-5:])
                self._end_failed(f"The encoder process stopped unexpectedly (exit code {rc}). {tail}".strip())
        return False

    # -- internals -----------------------------------------------------------------------------
    def _write_input(self) -> None:
        array = np.ascontiguousarray(np.asarray(self.volume.array, dtype=np.float32))
        np.save(self.work_dir / "volume.npy", array, allow_pickle=False)
        geometry = {
            "ijk_to_ras": np.asarray(self.volume.ijk_to_ras, dtype=float).tolist(),
            "source": getattr(self.volume, "source", None),
            "modality": getattr(self.volume, "modality", None) or "CT",
            "series_uid": getattr(self.volume, "series_uid", None),
        }
        (self.work_dir / "geometry.json").write_text(json.dumps(geometry))

    def _handle_line(self, line: str) -> None:
        if line.startswith(PROGRESS_TAG):
            parts = line.split(" ", 2)
            try:
                fraction = float(parts[1])
            except (IndexError, ValueError):
                return
            self.fraction = min(max(fraction, 0.0), 1.0)
            self.message = parts[2] if len(parts) > 2 else ""
            self.progress.emit(self.fraction, self.message)
        elif line.startswith(DONE_TAG):
            self.result_path = line[len(DONE_TAG):].strip()
        elif line.startswith(ERROR_TAG):
            message = line[len(ERROR_TAG):].strip()
            if self._cancel_requested_at is not None or message.startswith("cancelled"):
                self._end_cancelled()
            else:
                self._end_failed(message or "Encoding failed.")
        elif line.strip():
            self.log.append(line)

    def _end_finished(self) -> None:
        self.state = "finished"
        self.fraction = 1.0
        self.progress.emit(1.0, "Encoding finished.")
        self.finished.emit(self.result_path)

    def _end_failed(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        self.process.kill()
        self._cleanup()
        self.failed.emit(message)

    def _end_cancelled(self) -> None:
        self.state = "cancelled"
        self.process.kill()
        self.process.wait(timeout=5.0)
        self._cleanup()
        self.cancelled.emit()

    def _cleanup(self) -> None:
        if self.work_dir is not None and not self._work_dir_given:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def discard(self) -> None:
        """Delete the work folder (the saved encoding too) once the caller has loaded it."""
        if self.state == "running":
            self.cancel()
        self._cleanup()


def start_qt_polling(job: EncodingJob, interval_ms: int = 200):
    """Inside Slicer: poll ``job`` from a ``qt.QTimer`` until it ends. Returns the timer (keep a
    reference). Imported lazily so that this module works without Qt."""
    import qt

    timer = qt.QTimer()
    timer.setInterval(int(interval_ms))

    def _tick():
        if not job.poll():
            timer.stop()

    timer.connect("timeout()", _tick)
    timer.start()
    return timer
