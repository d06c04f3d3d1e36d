"""Access token of the web demo when it listens beyond this machine.

On loopback (the default, 127.0.0.1) only local users reach the demo and no token is needed.
Bound to any other interface (``--host 0.0.0.0`` on a ward network) every request to the
launcher and to each session process must carry the token: ``?token=…`` on the first page (the
URL printed at start), after which an HttpOnly cookie carries it — cookies are scoped to the host
name, not the port, so the session pages and their websockets on other ports get it too — or an
``Authorization: Bearer …`` header for scripts. Anything else is answered 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets

ENV = "CTLANGUAGE_WEB_TOKEN"   # how the launcher hands the token to its sessions (not argv: ps)
COOKIE = "ctlanguage_token"
REFUSED = ("401: this CTLanguage web demo needs its access token. Open the address that "
           "`ctlanguage web` printed at start (it ends in ?token=…).")


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name: may resolve to a public interface


def resolve_token(host: str, given: str | None = None) -> str | None:
    """The token to require: the one given (option or $CTLANGUAGE_WEB_TOKEN), else a fresh random
    one when ``host`` is not loopback, else None (no token on this machine only)."""
    token = given or os.environ.get(ENV) or None
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(18)
    return token


def supplied_token(request) -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip()
    return request.query.get("token") or request.cookies.get(COOKIE)


def token_ok(expected: str, supplied: str | None) -> bool:
    return supplied is not None and hmac.compare_digest(supplied.encode(), expected.encode())


def middleware(token: str):
    """aiohttp middleware: 401 without the token; a valid ``?token=`` also sets the cookie."""
    from aiohttp import web

    @web.middleware
    async def require_token(request, handler):
        if not token_ok(token, supplied_token(request)):
            return web.Response(status=401, text=REFUSED, content_type="text/plain",
                                headers={"WWW-Authenticate": 'Bearer realm="ctlanguage"',
                                         "Cache-Control": "no-store"})
        response = await handler(request)
        if request.query.get("token") and request.cookies.get(COOKIE) != token \
                and not getattr(response, "prepared", False):
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
        return response

    return require_token
