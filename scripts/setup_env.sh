#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the tested, pinned
# versions from requirements.lock.txt plus the engine itself (editable). Idempotent and quiet on reuse.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CTLANGUAGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.ctlanguage-lock.sha256"
want="$(sha256sum "$ROOT/requirements.lock.txt" "$ROOT/requirements-merlin-ref.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (torch 2.13.0 CPU wheel, monai, transformers, slicer-core ...)"
  "$VENV/bin/python" -m pip install -q --upgrade pip "setuptools==84.2.1"
  # --no-deps: the lock file is complete; this keeps a stray unpinned torch (CUDA build) out.
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements.lock.txt"
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  "$VENV/bin/python" -m pip check
  # merlin-vlm (the Merlin backend's reference) in its own folder, off the venv's path: see the file
  rm -rf "$VENV/merlin-ref"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/merlin-ref" -r "$ROOT/requirements-merlin-ref.txt"
  echo "$want" > "$STAMP"
fi
