"""How a browser passes the server's token to the pages when ``--protect-reads`` is on.

A browser cannot send ``Authorization: Bearer`` by itself, so the pages accept the token once:

- ``GET /any-page?token=TOKEN`` (or the form on the 401 page, which sends the same thing) checks
  the token, answers ``303`` to the same URL without ``token``, and sets the cookie
  ``registry_pages=<HMAC-SHA256(token, "registry pages")>`` (``HttpOnly``, ``SameSite=Strict``,
  ``Path=/``, ``Secure`` behind https). The cookie is not the token: it opens the pages, and
  nothing else (the ``/v1`` API and every write still need the bearer header).
- Later page requests carry the cookie; this middleware turns a valid one into the bearer header
  the server's ``GuardMiddleware`` checks, so there is one guard for pages and API alike.
- A client that can send headers (curl, a reverse proxy) may send ``Authorization: Bearer TOKEN``
  instead.

Without a valid token or cookie a page answers a readable HTML 401 (no token) or 403 (wrong
token), never the API's JSON. Static CSS/JS (``/-/static/``) is package data and always open, so
those error pages are styled too.
"""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

COOKIE = "registry_pages"
STATIC_PREFIX = "/-/static/"
PAGE_PREFIXES = ("/adapters", "/search", "/generators", "/bench")
READ_METHODS = ("GET", "HEAD")


def is_page(path: str) -> bool:
    """The paths of the HTML pages (``/`` and what lies under PAGE_PREFIXES)."""
    return path == "/" or any(path == p or path.startswith(p + "/") for p in PAGE_PREFIXES)


def cookie_value(token: str) -> str:
    """What the pages' cookie holds: derived from the token, so the cookie never reveals it."""
    return hmac.new(token.encode(), b"registry pages", hashlib.sha256).hexdigest()


class PageAuth:
    """ASGI middleware, outside the server's guard: serves static files, and for page requests on
    a server that protects reads, accepts ``?token=`` / the cookie / the bearer header."""

    def __init__(self, app, *, token: str | None, protect_reads: bool, static, render_error):
        self.app = app
        self.token = token or None
        self.protect_reads = protect_reads
        self.static = static  # an ASGI app for /-/static/
        self.render_error = render_error  # (status, title, message, **extra) -> Response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(STATIC_PREFIX) and scope["method"] in READ_METHODS:
            static_scope = dict(scope, path=path[len(STATIC_PREFIX) - 1:], root_path="")
            return await self.static(static_scope, receive, send)
        if not self.protect_reads or not is_page(path) or scope["method"] not in READ_METHODS:
            return await self.app(scope, receive, send)
        response = self._check(scope)
        if response is not None:
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _check(self, scope):
        """None to let the request through (with the bearer header set), else the response to send."""
        if self.token is None:
            return self.render_error(403, "Reads are protected",
                                     "This server protects reads but has no REGISTRY_TOKEN, so no one can read.")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        given = [v for k, v in query if k == "token"]
        if given:
            if not hmac.compare_digest(given[-1].strip().encode(), self.token.encode()):
                return self.render_error(403, "Wrong token", "That token is not this server's token.",
                                         ask_token=True)
            return self._set_cookie(scope, [(k, v) for k, v in query if k != "token"])
        authorization = headers.get("authorization")
        if authorization:  # the guard checks it (a JSON refusal would do, but a page reads better)
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
                return self.render_error(403, "Wrong token", "The Authorization header does not hold this "
                                         "server's token.", ask_token=True)
            return None
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed Cookie header is the same as none
            cookie = SimpleCookie()
        morsel = cookie.get(COOKIE)
        if morsel is not None and hmac.compare_digest(morsel.value.encode(), cookie_value(self.token).encode()):
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
            scope["headers"].append((b"authorization", f"Bearer {self.token}".encode("latin-1")))
            return None
        return self.render_error(401, "A token is needed",
                                 "This server protects reads: enter its token (REGISTRY_TOKEN) once, and this "
                                 "browser keeps a cookie for the pages.", ask_token=True,
                                 headers={"WWW-Authenticate": 'Bearer realm="registry"'})

    def _set_cookie(self, scope, rest: list[tuple[str, str]]):
        from starlette.responses import RedirectResponse

        location = scope.get("root_path", "") + scope["path"] + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(location, status_code=303)
        response.set_cookie(COOKIE, cookie_value(self.token), httponly=True, samesite="strict", path="/",
                            secure=scope.get("scheme") == "https")
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response
