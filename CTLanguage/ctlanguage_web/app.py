"""The page of one browser session: a trame-slicer app (Slicer slice + 3D views rendered on the
server, offscreen) around a :class:`~ctlanguage_web.session.WebSession`.

One process serves one session (one MRML scene, one engine): ``ctlanguage web`` runs the
launcher (``launcher.py``) that starts one of these per browser tab. It can also be run on its
own for development::

    python -m ctlanguage_web.app --port 9000 --work-dir /tmp/ctlweb

The process exits after ``--idle-timeout`` seconds without a connected page, or when the
launcher that started it goes away; its work folder (uploads, exports) is removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("ctlanguage_web")

def configure_offscreen_gl() -> str:
    """Pick VTK's offscreen OpenGL backend before any view is created: EGL when libEGL is there,
    else OSMesa. ``CTLANGUAGE_WEB_GL=egl|osmesa`` forces one. Returns the backend name."""
    want = os.environ.get("CTLANGUAGE_WEB_GL", "").lower()
    if os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") and not want:
        return os.environ["VTK_DEFAULT_OPENGL_WINDOW"]
    if not want:
        import ctypes.util

        want = "egl" if ctypes.util.find_library("EGL") else "osmesa"
    os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow" if want == "egl" else "vtkOSOpenGLRenderWindow"
    return os.environ["VTK_DEFAULT_OPENGL_WINDOW"]


class CTLanguageWebApp:
    def __init__(self, server=None, work_dir: str | Path | None = None, model: str = "default",
                 device: str | None = "cpu", max_upload_mb: float | None = None,
                 image_encoder: str = "png", engine_loader=None, access_token: str | None = None):
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from .page import no_gutter
        from .session import DEFAULT_MAX_UPLOAD_MB, WebSession

        self.server = get_server(server, client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ctlanguage-web-"))
        self.token = secrets.token_urlsafe(16)
        self.access_token = access_token  # required on every request when set (access.py)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder=image_encoder,
                               slice_view_ui_f=no_gutter, three_d_view_ui_f=no_gutter)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout("Quad View")
        self.session = WebSession(self.slicer_app, self.work_dir / "session", model=model, device=device,
                                  engine_loader=engine_loader,
                                  max_upload_mb=max_upload_mb or DEFAULT_MAX_UPLOAD_MB)
        self._upload_files: list = []
        self._upload_bytes = 0
        self._cancel = threading.Event()
        self._init_state()
        self._bind()
        self._build_ui()

    # ---- state ---------------------------------------------------------------------------------
    def _init_state(self):
        s = self.state
        s.trame__title = "CTLanguage — free-text CT findings"
        s.cases = self.session.bundled_cases()
        s.case_id = s.cases[0]["value"] if s.cases else None
        s.max_upload_bytes = self.session.max_upload_bytes
        s.load_message = ""
        s.load_message_type = "info"
        s.loading = False
        s.volume_info = ""
        s.truth_info = ""
        s.has_volume = False
        s.encoding = False
        s.encoded = False
        s.encode_progress = 0
        s.encode_message = ""
        s.encode_error = ""
        s.prompt_text = ""
        s.prompt_error = ""
        s.querying = False
        s.results = []
        s.selected_row = -1
        s.export_kinds = []
        s.export_warning = ""
        s.download_base = f"/ctl-download/{self.token}"
        s.model_label = self.session.model_label()
        s.models = self.session.model_choices()
        s.model_spec = self.session.logic.model_id
        s.model_error = ""
        self._show_model()

    def _show_model(self):
        s = self.state
        choice = next((m for m in s.models if m["value"] == s.model_spec), None) or {}
        s.model_details, s.model_notice = choice.get("details", ""), choice.get("notice", "")

    def select_model(self, spec):
        """The model menu: another model that is on disk; the CT must be encoded again."""
        s = self.state
        s.model_error = ""
        if spec == self.session.logic.model_id:
            return
        try:
            if s.encoding:
                raise ValueError("Wait for the encoding to finish (or cancel it) before changing the model.")
            self.session.set_model(spec)
        except ValueError as exc:
            s.model_error = str(exc)
            s.model_spec = self.session.logic.model_id
            return self._show_model()
        s.model_spec, s.model_label = spec, self.session.model_label()
        s.encoded, s.encode_progress = False, 0
        s.encode_message = "Model changed: press Encode." if s.has_volume else ""
        self._show_model()

    def _bind(self):
        ctrl = self.ctrl
        ctrl.ctl_load_case = self.load_case
        ctrl.ctl_encode = self.encode
        ctrl.ctl_cancel = self.cancel_encode
        ctrl.ctl_run = self.run_prompts
        self.server.trigger("ctl_model")(self.select_model)
        self.server.trigger("ctl_jump")(self.jump)
        self.server.trigger("ctl_remove")(self.remove)
        self.server.trigger("ctl_upload_chunk")(self.upload_chunk)
        self.server.trigger("ctl_upload_end")(self.upload_end)
        self.server.trigger("ctl_upload_refused")(self.upload_refused)
        self.server.trigger("ctl_view_geometry")(self.session.view_geometry)
        ctrl.on_server_bind.add(self._add_routes)

    # ---- actions -------------------------------------------------------------------------------
    def _loaded(self, loaded):
        s = self.state
        s.has_volume = True
        s.encoded = False
        s.encode_progress = 0
        s.encode_message = "Not encoded yet: press Encode."
        s.encode_error = ""
        s.results = []
        s.selected_row = -1
        s.export_kinds = self.session.export_kinds()
        s.volume_info = self.session.volume_summary()
        s.truth_info = self.session.truth_summary()
        s.load_message = f"Loaded {loaded.name}."
        s.load_message_type = "success"

    def _load_failed(self, message: str):
        self.state.load_message = message
        self.state.load_message_type = "error"

    def load_case(self):
        if self.state.encoding:
            return self._load_failed("Wait for the encoding to finish (or cancel it) before loading another CT.")
        try:
            self._loaded(self.session.load_bundled(self.state.case_id))
        except ValueError as exc:
            self._load_failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - never crash the session on a load
            log.exception("loading the synthetic case failed")
            self._load_failed(f"The synthetic case could not be made: {exc}")

    def upload_refused(self, name, size):
        self._load_failed(f"'{name}' is {float(size) / 1e6:.1f} MB; this demo accepts at most "
                          f"{self.session.max_upload_bytes / 1e6:g} MB.")

    def upload_chunk(self, files):
        try:
            return self._upload_chunk(files)
        except Exception as exc:  # noqa: BLE001 - never let an upload kill the session
            log.exception("upload failed")
            self._upload_files, self._upload_bytes = [], 0
            self._load_failed(f"The upload could not be received: {exc}")

    def _upload_chunk(self, files):
        from trame.app.file_upload import ClientFile

        if files:
            for f in files:
                cf = ClientFile(f)
                content = cf.content or b""
                self._upload_bytes += len(content)
                if self._upload_bytes <= self.session.max_upload_bytes:
                    self._upload_files.append((cf.name, content))
                else:
                    self._upload_files = [("", b"")]  # over the limit: keep nothing
            return
        files, self._upload_files = self._upload_files, []
        over = self._upload_bytes > self.session.max_upload_bytes
        total, self._upload_bytes = self._upload_bytes, 0
        if over:
            return self._load_failed(f"The upload is {total / 1e6:.1f} MB; this demo accepts at most "
                                     f"{self.session.max_upload_bytes / 1e6:g} MB.")
        if self.state.encoding:
            return self._load_failed("Wait for the encoding to finish (or cancel it) before loading another CT.")
        try:
            self._loaded(self.session.load_upload(files))
        except ValueError as exc:
            self._load_failed(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad upload must never crash the server
            log.exception("upload failed")
            self._load_failed(f"The upload could not be loaded: {exc}")

    def upload_end(self, status, message=None):
        if status != "success":
            self._load_failed(f"The upload failed in the browser: {message or 'unknown error'}.")
        self.state.loading = False

    def encode(self):
        s = self.state
        if s.encoding:
            return
        if not s.has_volume:
            s.encode_error = "Load a CT or a synthetic case first."
            return
        s.encoding, s.encoded, s.encode_error = True, False, ""
        s.encode_progress, s.encode_message = 0, "Starting"
        self._cancel.clear()
        from trame_server.utils.asynchronous import create_task

        create_task(self._encode())

    async def _encode(self):
        loop = asyncio.get_running_loop()

        def progress(fraction, message):
            loop.call_soon_threadsafe(self._set_progress, fraction, message)

        error = None
        try:
            await loop.run_in_executor(None, lambda: self.session.encode(progress, self._cancel.is_set))
        except ValueError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("encoding failed")
            error = f"Encoding failed: {exc}"
        with self.state:
            self.state.encoding = False
            self.state.encoded = self.session.is_encoded()
            self.state.model_label = self.session.model_label()
            if error:
                self.state.encode_error = error
                self.state.encode_message = ""
            else:
                self.state.encode_progress = 100
                self.state.encode_message = "Encoded: type a prompt."

    def _set_progress(self, fraction, message):
        with self.state:
            self.state.encode_progress = max(0, min(100, int(round(100 * float(fraction or 0)))))
            self.state.encode_message = str(message or "")

    def cancel_encode(self):
        self._cancel.set()
        self.state.encode_message = "Cancelling…"

    def run_prompts(self):
        s = self.state
        s.prompt_error = ""
        if not s.encoded:
            s.prompt_error = "Encode the CT first (press Encode)."
            return
        before = len(s.results or [])
        try:
            rows = self.session.run_prompts(s.prompt_text or "")
        except ValueError as exc:
            s.prompt_error = str(exc)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("prompt failed")
            s.prompt_error = f"The prompt failed: {exc}"
            return
        s.results = rows
        s.export_kinds = self.session.export_kinds()
        s.export_warning = ""   # new results: the next download exports them again
        # show the newest result that has a mask
        new = rows[before:] or rows[-1:]
        for r in new:
            if r["has_mask"]:
                self.jump(r["row"])
                break

    def jump(self, row):
        row = int(row)
        target = None
        try:
            target = self.session.jump_to_row(row)
        except Exception:  # noqa: BLE001
            log.exception("jump failed")
        self.state.selected_row = row
        if target is None:
            self.state.prompt_error = "That result has an empty mask: nothing to show."

    def remove(self, row):
        try:
            self.state.results = self.session.remove_row(int(row))
        except Exception as exc:  # noqa: BLE001
            self.state.prompt_error = str(exc)
        self.state.selected_row = -1

    # ---- downloads (plain HTTP, so the browser saves files natively) ----------------------------
    def _add_routes(self, wslink_server):
        from aiohttp import web

        if self.access_token:
            from .access import middleware

            wslink_server.app.middlewares.append(middleware(self.access_token))

        async def download(request):
            if request.match_info["token"] != self.token:
                raise web.HTTPNotFound()
            kind = request.match_info["kind"]
            loop = asyncio.get_running_loop()
            try:
                path, name, mime = await loop.run_in_executor(None, self.session.export_file, kind)
            except ValueError as exc:
                self._show_export_warning(str(exc))
                return web.Response(status=409, text=str(exc), content_type="text/plain")
            self._show_export_warning(" ".join(self.session.export_warnings))
            return web.FileResponse(path, headers={
                "Content-Disposition": f'attachment; filename="{name}"', "Content-Type": mime,
                "Cache-Control": "no-store"})

        wslink_server.app.router.add_get("/ctl-download/{token}/{kind}", download)

    def _show_export_warning(self, text: str) -> None:
        """The export's warnings (e.g. the DICOM SEG was not written, and why) in the page: a
        download is a plain HTTP request, so the page learns of them only through the state."""
        with self.state:
            self.state.export_warning = text

    def _build_ui(self):
        from .page import build_page

        self.ui = build_page(self)


# ---- process entry point -------------------------------------------------------------------------

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="One CTLanguage web session (normally started by `ctlanguage web`).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--work-dir", default=None, help="private folder of this session (removed on exit)")
    p.add_argument("--model", default=os.environ.get("CTLANGUAGE_WEB_MODEL", "default"))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--max-upload-mb", type=float, default=None)
    p.add_argument("--idle-timeout", type=int, default=120,
                   help="exit after this many seconds without a connected page")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--ready-file", default=None, help="written with the port once the server listens")
    p.add_argument("--image-encoder", default="png", choices=["png", "jpeg", "turbo-jpeg", "webp"])
    return p


def main(argv=None) -> int:
    args, _unknown = build_arg_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("trame_client", "trame_server", "wslink", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_offscreen_gl()
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ctlanguage-web-"))
    work_dir.mkdir(parents=True, exist_ok=True)

    def _cleanup():
        shutil.rmtree(work_dir, ignore_errors=True)

    atexit.register(_cleanup)
    device = None if args.device == "auto" else args.device
    from .access import ENV

    app = CTLanguageWebApp(work_dir=work_dir, model=args.model, device=device,
                           max_upload_mb=args.max_upload_mb, image_encoder=args.image_encoder,
                           access_token=os.environ.pop(ENV, None))

    @app.ctrl.add("on_server_ready")
    def _ready(**_):
        if args.ready_file:
            tmp = Path(args.ready_file + ".tmp")
            tmp.write_text(str(app.server.port))
            os.replace(tmp, args.ready_file)
        log.info("session ready on http://%s:%s/", args.host, app.server.port)
        if args.parent_pid:
            from trame_server.utils.asynchronous import create_task

            create_task(_watch_parent(args.parent_pid, _cleanup))

    try:
        app.server.start(host=args.host, port=args.port, open_browser=False, show_connection_info=False,
                         timeout=args.idle_timeout, disable_logging=True)
    finally:
        _cleanup()
    return 0


async def _watch_parent(pid: int, cleanup):
    while True:
        await asyncio.sleep(2.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.info("launcher %s is gone: exiting", pid)
            cleanup()
            os._exit(0)
        except PermissionError:
            pass


if __name__ == "__main__":
    sys.exit(main())
