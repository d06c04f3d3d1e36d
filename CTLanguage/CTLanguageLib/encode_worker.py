"""Encoder worker: runs in its own process (PythonSlicer inside Slicer), started by
``background.EncodingJob``. Reads the volume (``.npy`` [k,j,i] + geometry JSON), loads the model,
encodes, saves the encoding, and reports on stdout with the line protocol of
``worker_process.py``. Never imports Slicer, Qt or MRML.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback

from CTLanguageLib.worker_process import CANCELLED_MESSAGE, DONE_TAG, ERROR_TAG, format_line, format_progress


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--input", required=True)
    p.add_argument("--geometry", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--output", required=True)
    p.add_argument("--cancel-file", default=None)
    a = p.parse_args(argv)

    def progress(fraction, message=""):
        _say(format_progress(fraction, message))

    def cancel() -> bool:
        return bool(a.cancel_file) and os.path.exists(a.cancel_file)

    try:
        import numpy as np

        progress(0.01, "Loading the engine…")
        from ctlanguage.engine import Engine
        from ctlanguage.errors import CancelledError, CTLanguageError
        from ctlanguage.volume import CTVolume
    except Exception as exc:  # engine or torch missing
        _say(format_line(ERROR_TAG, f"The CTLanguage engine could not be imported ({exc}); install the dependencies from the module panel."))
        return 2

    try:
        geometry = json.loads(open(a.geometry, encoding="utf-8").read())
        array = np.load(a.input, allow_pickle=False)
        volume = CTVolume(array=array, ijk_to_ras=np.asarray(geometry["ijk_to_ras"], dtype=float),
                          source=geometry.get("source"), modality=geometry.get("modality") or "CT",
                          series_uid=geometry.get("series_uid"))
        if cancel():
            raise CancelledError(CANCELLED_MESSAGE)
        progress(0.05, f"Loading model '{a.model}'…")
        engine = Engine.load(model=a.model, device=(a.device or None),
                             progress=lambda f, m="": progress(0.05 + 0.15 * float(f), m))
        if cancel():
            raise CancelledError(CANCELLED_MESSAGE)
        encoding = engine.encode(volume, progress=lambda f, m="": progress(0.2 + 0.75 * float(f), m),
                                 cancel=cancel)
        progress(0.97, "Saving the encoding…")
        encoding.save(a.output)
        _say(format_line(DONE_TAG, os.path.abspath(a.output)))
        return 0
    except CancelledError:
        _say(format_line(ERROR_TAG, CANCELLED_MESSAGE))
        return 3
    except CTLanguageError as exc:
        _say(format_line(ERROR_TAG, str(exc)))
        return 2
    except Exception as exc:  # unexpected: keep the traceback in the log, one line for the user
        traceback.print_exc(file=sys.stdout)
        _say(format_line(ERROR_TAG, f"Encoding failed: {type(exc).__name__}: {exc}"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
