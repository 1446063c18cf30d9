"""Who may call what, and how large a body may be: a plain ASGI middleware in front of the app,
so the bearer token and the body limit are checked before FastAPI parses a body."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

READ_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def json_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """Every error of the server: a JSON body ``{"error": "..."}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --------------------------------------------------------------------------------------------
# Auth and body size: a plain ASGI middleware, so both are checked before FastAPI parses a body
# --------------------------------------------------------------------------------------------


class GuardMiddleware:
    """Bearer token on writes (and on reads when ``protect_reads``); bodies over the limit get 413."""

    def __init__(self, app, token: str | None, protect_reads: bool, max_body_bytes: int):
        self.app = app
        self.token = token or None
        self.protect_reads = protect_reads
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        write = method not in READ_METHODS
        if not write and not self.protect_reads:
            return await self.app(scope, receive, send)  # the common case: no header to look at
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path not in OPEN_PATHS:
            refusal = self._check_token(headers.get("authorization"), write)
            if refusal is not None:
                return await refusal(scope, receive, send)
        if not write:
            return await self.app(scope, receive, send)

        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return await json_error(400, "invalid Content-Length header")(scope, receive, send)
            if int(declared) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    def _check_token(self, authorization: str | None, write: bool):
        if self.token is None:
            if write:
                return json_error(403, "writes are disabled: start the server with REGISTRY_TOKEN set")
            return json_error(403, "reads are protected but the server has no REGISTRY_TOKEN")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            what = "writes need" if write else "this server protects reads: requests need"
            return json_error(401, f"{what} an 'Authorization: Bearer <token>' header",
                               {"WWW-Authenticate": 'Bearer realm="registry"'})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return json_error(403, "wrong token")
        return None

    async def _too_large(self, scope, receive, send):
        return await json_error(413, f"request body over the limit of {self.max_body_bytes} bytes")(
            scope, receive, send)
