#!/usr/bin/env bash
# The main job: on the embedded default model, make a synthetic CT case (NIfTI + DICOM series),
# encode it once, answer several free-text prompts, and write every export to ./demo_output.
# Creates/reuses .venv with pinned versions. Extra arguments go to `ctlanguage demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$ROOT/.venv/bin/ctlanguage" demo --out "${CTLANGUAGE_DEMO_OUT:-$ROOT/demo_output}" "$@"
