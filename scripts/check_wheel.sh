#!/usr/bin/env bash
# Build the wheel and prove it is complete: a fresh virtual environment gets nothing but
# `pip install torch==2.13.0` and `pip install <the wheel>` (versions held to requirements.lock.txt),
# then `ctlanguage demo` runs offline (HF_HUB_OFFLINE) from an unrelated folder.
# pip's download cache is reused, so a second run takes about a minute.
# Usage: scripts/check_wheel.sh [WORK_DIR]   (default: a temporary folder, removed afterwards)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ $# -ge 1 ]; then WORK="$1"; mkdir -p "$WORK"; else WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT; fi
WORK="$(cd "$WORK" && pwd)"
t0=$SECONDS
echo "[wheel] building"
# from a copy of the sources, so that no stale build/ folder of the checkout ends up in the wheel
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
cp -r "$ROOT"/{pyproject.toml,setup.py,MANIFEST.in,README.md,LICENSE,CTLanguage,Resources} "$WORK/src/"
find "$WORK/src" \( -name __pycache__ -o -name "*.egg-info" \) -prune -exec rm -rf {} +
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/ctlanguage-*.whl)"
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["ctlanguage/_resources/catalog.json", "ctlanguage/_resources/Models/ctlanguage-synth-v2/model.safetensors",
        "ctlanguage/_resources/Models/ctlanguage-synth-v2/text_embeddings.safetensors",
        "ctlanguage/_resources/Models/ctlanguage-synth-v3/model.safetensors",
        "ctlanguage/_resources/Models/ctlanguage-synth-v3/text_embeddings.safetensors",
        "ctlanguage/data/vocabulary.json"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"[wheel] missing from {sys.argv[1]}: {missing}")
print(f"[wheel] {len(names)} files, resources included")
PYEOF
echo "[wheel] fresh venv: $TORCH_SPEC, then the wheel"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "$TORCH_SPEC"
"$VPY" -m pip install -q -c "$ROOT/requirements.lock.txt" "$WHEEL"
"$VPY" -m pip check
echo "[wheel] ctlanguage demo (offline)"
rm -rf "$WORK/run"; mkdir -p "$WORK/run"
( cd "$WORK/run" && env -u PYTHONPATH -u CTLANGUAGE_RESOURCES HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    CTLANGUAGE_CACHE="$WORK/run/cache" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" \
    "$WORK/venv/bin/ctlanguage" --quiet demo --out d )
for f in findings.json findings.csv report.html segmentation.seg.nrrd segmentation.dcm; do
  [ -s "$WORK/run/d/results/$f" ] || { echo "[wheel] demo did not write results/$f" >&2; exit 1; }
done
echo "[wheel] ok: wheel installs and runs the demo offline ($((SECONDS - t0)) s)"
