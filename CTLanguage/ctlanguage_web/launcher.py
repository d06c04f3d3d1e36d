"""``ctlanguage web``: a small HTTP launcher that gives every browser tab its own session process.

trame apps hold one shared state per process, so two tabs of one trame server would see the same
CT and results. The launcher serves ``/`` (a "starting your session" page); the page asks for
``POST /session``, the launcher starts ``python -m ctlanguage_web.app`` on a free localhost port
with a private work folder and answers with that session's URL, and the page moves there.

Bound beyond loopback, the launcher and every session require an access token (see access.py).

A session process exits on its own ``--idle-timeout`` after its tab is closed, or when the
launcher is gone; the launcher removes each finished session's folder, and on exit stops every
session it started and removes its whole temporary folder.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import access

log = logging.getLogger("ctlanguage_web.launcher")

START_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>CTLanguage</title>
<style>body{background:#1e1e1e;color:#ddd;font-family:sans-serif;display:flex;align-items:center;
justify-content:center;height:100vh;margin:0}.box{text-align:center}#err{color:#ff8a80;max-width:40em}</style>
</head><body><div class="box"><h2>CTLanguage</h2><p id="msg">Starting your session&hellip;</p>
<p id="err"></p></div>
<script>
fetch("session", {method: "POST"}).then(async (r) => {
  const body = await r.json().catch(() => ({error: "The server answered " + r.status + "."}));
  if (!r.ok || !body.url) throw new Error(body.error || ("The server answered " + r.status + "."));
  window.location.replace(body.url);
}).catch((e) => {
  document.getElementById("msg").textContent = "Could not start a session.";
  document.getElementById("err").textContent = String(e.message || e);
});
</script></body></html>
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(self, host: str = "127.0.0.1", port: int = 8080, model: str = "default",
                 device: str = "cpu", max_sessions: int = 4, max_upload_mb: float | None = None,
                 idle_timeout: int = 120, start_timeout: float = 180.0, image_encoder: str = "png",
                 token: str | None = None):
        self.host, self.port = host, port
        self.token = token  # None: no access token (loopback only; see access.resolve_token)
        self.model, self.device = model, device
        self.max_sessions = max_sessions
        self.max_upload_mb = max_upload_mb
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self.image_encoder = image_encoder
        self.base_dir = Path(tempfile.mkdtemp(prefix="ctlanguage-web-"))
        self.sessions: dict[int, tuple[subprocess.Popen, Path]] = {}  # port -> (process, folder)
        self._n = 0

    # ---- sessions ------------------------------------------------------------------------------
    def _reap(self) -> None:
        for port, (proc, folder) in list(self.sessions.items()):
            if proc.poll() is not None:
                shutil.rmtree(folder, ignore_errors=True)
                del self.sessions[port]
                log.info("session on port %s ended (exit %s); its files are removed", port, proc.returncode)

    async def start_session(self, public_host: str | None = None) -> str:
        """Start a session process; returns its URL on ``public_host`` (the host name the browser
        used to reach the launcher) or the listening host."""
        self._reap()
        if len(self.sessions) >= self.max_sessions:
            raise RuntimeError(f"{len(self.sessions)} sessions are open, the most this server runs at once; "
                               "close another tab and try again in a minute.")
        self._n += 1
        folder = self.base_dir / f"session_{self._n:03d}"
        folder.mkdir()
        port = free_port(self.host)
        ready = folder / "ready"
        cmd = [sys.executable, "-m", "ctlanguage_web.app", "--host", self.host, "--port", str(port),
               "--work-dir", str(folder / "work"), "--model", self.model, "--device", self.device,
               "--idle-timeout", str(self.idle_timeout), "--parent-pid", str(os.getpid()),
               "--ready-file", str(ready), "--image-encoder", self.image_encoder]
        if self.max_upload_mb:
            cmd += ["--max-upload-mb", str(self.max_upload_mb)]
        logf = open(folder / "session.log", "wb")
        # torch's compile cache would otherwise land in $TMPDIR and outlive the demo
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(self.base_dir / "torch_cache"))
        env.pop(access.ENV, None)
        if self.token:
            env[access.ENV] = self.token  # the session requires the same token
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(folder), start_new_session=True, env=env)
        logf.close()
        self.sessions[port] = (proc, folder)
        t0 = time.monotonic()
        while not ready.exists():
            if proc.poll() is not None:
                tail = _tail(folder / "session.log")
                self._reap()
                raise RuntimeError(f"The session process stopped while starting (exit {proc.returncode}). {tail}")
            if time.monotonic() - t0 > self.start_timeout:
                self.stop_session(port)
                raise RuntimeError("The session did not start in time; the server may be overloaded.")
            await asyncio.sleep(0.2)
        log.info("session %s started on port %s in %.1f s", self._n, port, time.monotonic() - t0)
        return f"http://{public_host or self.host}:{port}/"

    def stop_session(self, port: int) -> None:
        proc, folder = self.sessions.pop(port, (None, None))
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def shutdown(self) -> None:
        for port in list(self.sessions):
            self.stop_session(port)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    # ---- HTTP ----------------------------------------------------------------------------------
    def make_app(self):
        from aiohttp import web

        async def index(request):
            if self.token and request.query.get("token"):
                # the token is now in a cookie (access.middleware): drop it from the address bar
                return web.Response(status=302, headers={"Location": "/", "Cache-Control": "no-store"})
            return web.Response(text=START_PAGE, content_type="text/html",
                                headers={"Cache-Control": "no-store"})

        async def session(request):
            host = (request.url.host or "").strip("[]") or None
            if host and ":" in host:
                host = f"[{host}]"
            try:
                url = await self.start_session(host)
            except RuntimeError as exc:
                return web.json_response({"error": str(exc)}, status=503)
            return web.json_response({"url": url})

        async def health(_request):
            self._reap()
            return web.json_response({"ok": True, "sessions": sorted(self.sessions)})

        async def reaper(app):
            async def loop():
                while True:
                    await asyncio.sleep(5)
                    self._reap()

            task = asyncio.create_task(loop())
            yield
            task.cancel()

        app = web.Application(middlewares=[access.middleware(self.token)] if self.token else [])
        app.router.add_get("/", index)
        app.router.add_post("/session", session)
        app.router.add_get("/healthz", health)
        app.cleanup_ctx.append(reaper)
        return app

    def run(self) -> None:
        from aiohttp import web

        if self.token:
            shown = self.host if not self.host.startswith("0.0.0.0") and self.host not in ("::", "") \
                else "<this machine's address>"
            print(f"CTLanguage web demo listening on {self.host}:{self.port}; every request needs the "
                  f"access token. Open http://{shown}:{self.port}/?token={self.token} in a browser "
                  "(each tab is its own session). Ctrl+C stops it.", flush=True)
        else:
            print(f"CTLanguage web demo: open http://{self.host}:{self.port}/ in a browser "
                  "(each tab is its own session). Ctrl+C stops it.", flush=True)
        try:
            web.run_app(self.make_app(), host=self.host, port=self.port, print=None)
        finally:
            self.shutdown()


def _tail(path: Path, n: int = 600) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[-n:]
