"""Encoding in a separate process, with progress and cancel.

The Slicer GUI never runs the image encoder itself: :class:`EncodingJob` writes the volume to a
private work folder, starts ``encode_worker.py`` in a separate Python process (``PythonSlicer``
inside Slicer, ``sys.executable`` elsewhere) and reads its progress lines (protocol:
``worker_process``). Inside Slicer a ``qt.QTimer`` calls :meth:`EncodingJob.poll` (see
:func:`start_qt_polling`), so the GUI stays responsive; scripted and batch use passes
``waitForCompletion=True``.

Testability (the SlicerNNUnet pattern): the process object is injectable (``process_factory``)
and the signals are pure Python (``signals.Signal``), so the whole state machine runs under pytest
without Qt. Nothing is written to the MRML scene by this module; a cancelled or failed job only
deletes its own work folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .signals import Signal
from .worker_process import (CANCEL_FILE, CANCELLED_MESSAGE, WORKER_SCRIPT, SubprocessProcess, parse_line,
                             python_executable, worker_env)


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
        env = worker_env()
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
        parsed = parse_line(line)
        if parsed is None:
            return
        kind, value = parsed
        if kind == "progress":
            self.fraction, self.message = value
            self.progress.emit(self.fraction, self.message)
        elif kind == "done":
            self.result_path = value
        elif kind == "error":
            if self._cancel_requested_at is not None or value.startswith(CANCELLED_MESSAGE):
                self._end_cancelled()
            else:
                self._end_failed(value or "Encoding failed.")
        else:
            self.log.append(value)

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
