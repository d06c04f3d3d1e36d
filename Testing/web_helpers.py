"""Helpers for the browser end-to-end test (Testing/test_web_e2e.py): start/stop `ctlanguage web`,
drive Debian's Chromium through Playwright, and read the server-rendered view images."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

CHROMIUM = os.environ.get("CTLANGUAGE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offscreen_gl_available() -> bool:
    import ctypes.util

    return bool(ctypes.util.find_library("EGL") or ctypes.util.find_library("OSMesa"))


class WebServer:
    """`python -m ctlanguage.cli web` in its own process group, with TMPDIR set to ``tmp`` so that
    every temporary file of the launcher and its sessions can be checked afterwards. With
    ``token`` it requires that access token (as when bound beyond loopback); ``url`` is reached
    over loopback either way."""

    def __init__(self, tmp: Path, model: str, extra_args=(), timeout: float = 60.0,
                 host: str = "127.0.0.1", token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.token = token
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("CTLANGUAGE_WEB_TOKEN", None)
        if token:
            env["CTLANGUAGE_WEB_TOKEN"] = token
        self.log_path = self.tmp.parent / f"web_{self.port}.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "ctlanguage.cli", "web", "--host", host, "--port", str(self.port),
               "--model", model, *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ctlanguage web exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                req = urllib.request.Request(
                    self.url + "healthz", headers={"Authorization": f"Bearer {token}"} if token else {})
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError("ctlanguage web did not answer in time")
            time.sleep(0.3)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT (like Ctrl+C: the launcher stops its sessions and removes its files), then
        SIGKILL for the whole process group if anything is left."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


def view_image(page, name: str, retries: int = 20) -> np.ndarray:
    """The image the server last sent for view ``name`` (axial, coronal, sagittal, 3d) as an
    RGB uint8 array, exactly as rendered (the demo streams PNG)."""
    from PIL import Image

    js = """async (name) => {
      const label = document.getElementById('ctl-view-' + name);
      const img = label && label.parentElement.querySelector('img.image-display-area');
      if (!img || !img.src || !img.naturalWidth) return null;
      const buf = await (await fetch(img.src)).arrayBuffer();
      let s = ''; const b = new Uint8Array(buf);
      for (let i = 0; i < b.length; i += 0x8000) s += String.fromCharCode.apply(null, b.subarray(i, i + 0x8000));
      return btoa(s);
    }"""
    last = None
    for _ in range(retries):
        try:
            data = page.evaluate(js, name)
        except Exception as exc:  # noqa: BLE001 - the blob was replaced by a newer frame: retry
            last = exc
            data = None
        if data:
            return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        time.sleep(0.25)
    raise AssertionError(f"no image for view {name!r} ({last})")


def wait_stable_image(page, name: str, settle: float = 1.0, timeout: float = 30.0) -> np.ndarray:
    """Wait until two images of the view ``settle`` seconds apart are identical."""
    t0 = time.monotonic()
    prev = view_image(page, name)
    while time.monotonic() - t0 < timeout:
        time.sleep(settle)
        cur = view_image(page, name)
        if cur.shape == prev.shape and np.array_equal(cur, prev):
            return cur
        prev = cur
    return prev


def hex_rgb(color: str) -> np.ndarray:
    color = color.lstrip("#")
    return np.array([int(color[i:i + 2], 16) for i in (0, 2, 4)], dtype=float)


def overlay_pixels(image: np.ndarray, color: np.ndarray, min_chroma: float = 20.0,
                   min_cosine: float = 0.9) -> np.ndarray:
    """Boolean map of pixels tinted by a segment of ``color`` drawn over a grey CT: their
    deviation from grey points the same way as the colour's (fill is a blend, outline is exact)."""
    img = image.astype(float)
    dev = img - img.mean(axis=2, keepdims=True)
    chroma = np.linalg.norm(dev, axis=2)
    ref = color - color.mean()
    ref = ref / max(np.linalg.norm(ref), 1e-6)
    cos = (dev @ ref) / np.maximum(chroma, 1e-6)
    return (chroma >= min_chroma) & (cos >= min_cosine)


def pixels_to_ras(rows: np.ndarray, cols: np.ndarray, height: int, xy_to_ras) -> np.ndarray:
    """Image pixel (row, col) -> RAS mm through the slice node's XYToRAS (XY origin bottom-left)."""
    m = np.asarray(xy_to_ras, dtype=float)
    xy = np.stack([cols + 0.5, (height - 1 - rows) + 0.5, np.zeros_like(cols, dtype=float),
                   np.ones_like(cols, dtype=float)], axis=0)
    return (m @ xy)[:3].T


def ras_in_mask(ras: np.ndarray, mask: np.ndarray, ijk_to_ras, dilate: int = 1) -> np.ndarray:
    """For RAS points: does the (dilated) [k,j,i] mask contain them?"""
    from scipy import ndimage

    m = ndimage.binary_dilation(mask > 0, iterations=dilate) if dilate else mask > 0
    inv = np.linalg.inv(np.asarray(ijk_to_ras, dtype=float))
    ijk = (inv @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    idx = np.rint(ijk).astype(int)
    i, j, k = idx[:, 0], idx[:, 1], idx[:, 2]
    ok = (i >= 0) & (j >= 0) & (k >= 0) & (k < m.shape[0]) & (j < m.shape[1]) & (i < m.shape[2])
    out = np.zeros(len(ras), dtype=bool)
    out[ok] = m[k[ok], j[ok], i[ok]]
    return out
