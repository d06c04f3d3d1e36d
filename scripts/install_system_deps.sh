#!/usr/bin/env bash
# System packages for the browser demo and its end-to-end test (Debian/Ubuntu):
#   chromium                        the browser Playwright drives (never Playwright's own download)
#   libegl1 libegl-mesa0            offscreen OpenGL through EGL (VTK's vtkEGLRenderWindow)
#   libgl1-mesa-dri                 Mesa's software rasteriser (llvmpipe) behind EGL
#   libosmesa6                      fallback: VTK's vtkOSOpenGLRenderWindow
#   fonts-dejavu-core               a font for the page in headless Chromium
# Idempotent and quiet; returns at once when everything is installed. Needs root (or sudo) only
# when something is missing. Set CTLANGUAGE_SKIP_SYSTEM_DEPS=1 to skip.
set -euo pipefail
[ "${CTLANGUAGE_SKIP_SYSTEM_DEPS:-0}" = "1" ] && exit 0
PKGS=(chromium libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6 fonts-dejavu-core)
missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "[system-deps] not a Debian/Ubuntu system; install: ${missing[*]}" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "[system-deps] missing ${missing[*]} and not root; the browser test will be skipped" >&2
    exit 0
  fi
fi
echo "[system-deps] installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# A failed install must not take the whole suite down: the browser test then skips with a reason.
if ! { $SUDO apt-get update -qq >/dev/null && \
       $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "[system-deps] could not install ${missing[*]}; the browser end-to-end test will be skipped" >&2
fi
