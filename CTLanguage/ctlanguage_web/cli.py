"""`ctlanguage web [--port P] [--host 127.0.0.1]`: the browser demo (trame-slicer).

Registered in the engine's CLI through the ``ctlanguage.cli`` entry-point group (pyproject.toml),
so the engine never imports the web demo. Registering imports nothing heavy: trame, vtk and
slicer-core are imported inside the handler.
"""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "web", help="browser demo: upload a CT or pick a synthetic case, prompt, see overlays",
        description="Serve the CTLanguage browser demo (trame-slicer, rendered on this machine). "
                    "Each browser tab gets its own session process.")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port of the start page (default 8080)")
    p.add_argument("--model", default="default", help="model id or folder (default: the embedded model)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--max-sessions", type=int, default=4, help="browser sessions at once (default 4)")
    p.add_argument("--max-upload-mb", type=float, default=None, help="upload size limit (default 512 MB)")
    p.add_argument("--token", default=None,
                   help="access token to require (default: $CTLANGUAGE_WEB_TOKEN; when --host is not "
                        "loopback and neither is set, a random token is made and printed)")
    p.add_argument("--idle-timeout", type=int, default=120,
                   help="seconds a session lives on after its tab is closed (default 120)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ctlanguage.errors import InputError

    from .access import resolve_token

    try:
        from .launcher import Launcher
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise InputError(f"The web demo needs trame-slicer ({exc}); install the project's pinned "
                         "requirements (scripts/setup_env.sh).") from None
    if args.port < 0 or args.port > 65535:
        raise InputError(f"Port {args.port} is out of range.")
    Launcher(host=args.host, port=args.port, model=args.model, device=args.device,
             max_sessions=args.max_sessions, max_upload_mb=args.max_upload_mb,
             idle_timeout=args.idle_timeout, token=resolve_token(args.host, args.token)).run()
    return 0
