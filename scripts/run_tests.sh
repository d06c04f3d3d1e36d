#!/usr/bin/env bash
# Run the whole test suite on a fresh or existing machine: installs system packages needed by the
# browser end-to-end test (Chromium, offscreen OpenGL), creates/reuses .venv with pinned versions,
# then runs pytest. Extra arguments are passed to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -x scripts/install_system_deps.sh ]; then bash scripts/install_system_deps.sh; fi
bash scripts/setup_env.sh
export PYTHONHASHSEED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
set +e
"$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
status=$?
set -e
# pytest exit code 5 = no tests collected: treat as failure, a suite that runs nothing proves nothing.
exit $status
