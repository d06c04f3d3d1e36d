"""Access token of `ctlanguage web` beyond loopback (issue 13 §5), without a browser: the real
launcher process bound to 0.0.0.0 answers 401 without the token, and the middleware every session
process uses. The browser test (test_web_e2e.py) runs the whole demo with a token."""

from __future__ import annotations

import asyncio
import secrets
import urllib.error
import urllib.request

import pytest

pytest.importorskip("aiohttp")

from ctlanguage_web import access  # noqa: E402
from web_helpers import WebServer  # noqa: E402


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def _get(url, headers=None, method="GET"):
    opener = urllib.request.build_opener(_NoRedirect)
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def test_launcher_beyond_loopback_refuses_requests_without_the_token(tmp_path):
    token = "t-" + secrets.token_urlsafe(12)
    server = WebServer(tmp_path / "srv", "default", host="0.0.0.0", token=token)
    try:
        base = server.url
        for url in (base, base + "healthz", base + "?token=wrong", base + "healthz?token=" + token[:-1]):
            status, _, body = _get(url)
            assert status == 401 and "access token" in body, (url, status)
        assert _get(base + "session", method="POST")[0] == 401  # no session process started
        status, headers, _ = _get(base + "?token=" + token)
        assert status == 302 and headers["Location"] == "/"
        cookie = headers["Set-Cookie"]
        assert f"{access.COOKIE}={token}" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, _, body = _get(base, {"Cookie": f"{access.COOKIE}={token}"})
        assert status == 200 and "Starting your session" in body
        assert _get(base + "healthz", {"Authorization": f"Bearer {token}"})[0] == 200
        assert "?token=" + token in server.log()  # the address to open is printed at start
    finally:
        server.stop()


def test_token_only_beyond_loopback(monkeypatch):
    monkeypatch.delenv(access.ENV, raising=False)
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert access.resolve_token(host) is None, host
    a, b = access.resolve_token("0.0.0.0"), access.resolve_token("192.168.1.20")
    assert a and b and a != b and len(a) >= 20
    assert access.resolve_token("ward-pc.local") is not None
    assert access.resolve_token("0.0.0.0", "given") == "given"
    monkeypatch.setenv(access.ENV, "from-env")
    assert access.resolve_token("0.0.0.0") == "from-env"
    assert access.resolve_token("127.0.0.1") == "from-env"  # given on loopback: required too


def test_session_middleware_cookie_flow():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def hello(_request):
        return web.Response(text="session page")

    async def go():
        app = web.Application(middlewares=[access.middleware("s3cret")])
        app.router.add_get("/", hello)
        async with TestClient(TestServer(app)) as client:
            r = await client.get("/")
            assert r.status == 401
            r = await client.get("/", headers={"Authorization": "Bearer nope"})
            assert r.status == 401
            r = await client.get("/?token=s3cret")
            assert r.status == 200 and await r.text() == "session page"
            r = await client.get("/")  # the cookie now carries the token
            assert r.status == 200

    asyncio.run(go())
