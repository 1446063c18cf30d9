"""The registry over HTTP (``registry serve``): what serving systems on other machines fetch from.

Reads (open, or token-protected with ``protect_reads``):

    GET  /healthz                                   liveness, never protected
    GET  /v1/adapters?name=&kind=&task=&tag=&base_model=
    GET  /v1/search?q=TEXT[&q=TEXT...]&k=5&kind=&base_model=&exclude_task=
    GET  /v1/adapters/{ref}                         metadata + lineage (parents and children)
    GET  /v1/adapters/{ref}/prompts                 the adapter's sample prompts
    GET  /v1/adapters/{ref}/files/{file}            adapter_config.json | adapter_model.safetensors
    GET  /v1/adapters/{ref}/archive                 the PEFT directory as one uncompressed tar

Writes (always need ``Authorization: Bearer $REGISTRY_TOKEN``; refused when the server has none):

    PUT  /v1/adapters/{name}/aliases/{alias}        body {"version": 3}: move or create an alias
    POST /v1/generate     body {"prompts": [...], "name": ..., "generator": REF?, "task": ...?}
    POST /v1/compose      body {"prompts": [...], "name": ..., "k": 3, "strategy": "mixture", "task": ...?,
                                "exclude_tasks": [...]?}

Generate and compose call ``generator.service.generate_adapter`` and
``retrieval.service.compose_adapter``, imported when a request comes in (one such call at a time);
while those modules or functions do not exist the endpoints answer 501 with a JSON error. Both
answer 201 with the new adapter's metadata and a ``Location``.

Files are served by content: ``ETag`` is the file's sha256 (the weights blob's digest, or the
config's digest over the exact bytes served, which are the canonical JSON of the stored config), so
``If-None-Match`` answers 304 and ``Range``/``If-Range`` resume a partial download (one range per
request; a multi-range request gets the whole file). Every adapter response names what the REF
resolved to in ``X-Registry-Ref`` (name@version) and ``X-Registry-Digest``: a client that resolves
an alias once and then fetches by ``sha256:<digest>`` never mixes two versions when the alias moves.
Responses for immutable REFs (``name@3``, ``sha256:...``) may be cached for a year; alias and
latest REFs are ``no-cache``.

Every error is a JSON body ``{"error": "..."}``: 400 for a malformed REF or body, 401 without a
token, 403 with a wrong one, 404 for an unknown adapter, route or file, 413 for a body over
``max_body_bytes`` (1 MiB by default), 416 for an unsatisfiable range, 422 for a body of the wrong
shape, 501 for generate/compose without a backend.

Speed (the decisions; measured by ``benchmarks/bench_serve_load.py``):

- the four adapter reads are answered by ``serve_reads.FastReads`` in front of FastAPI, from
  memory: per request one change-stamp read (``serve_cache.ChangeStamp``: SQLite's
  ``data_version``, PostgreSQL's current snapshot) says whether anything was committed since the
  cached answer was built; what depends only on a digest (config bytes, prompts, verified blobs)
  is kept for good; so a REF costs SQL only the first time after a change, and an alias moved by
  any process shows on the next request;
- blobs go out with ``sendfile`` through the ASGI zero-copy extension that ``serve_http`` adds to
  uvicorn's protocol, headers in the same TCP segment as the body;
- ``/v1/search`` and ``/v1/compose`` catch the FAISS index up only after a change, by the rows
  added since (``serve_cache.IndexFollower``);
- one uvicorn worker (``uvicorn_options``): the index and the models live in the process.
"""

import contextlib
import hmac
import importlib
import io
import json
import logging
import os
import tarfile
import threading
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Body, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import IntegrityError, RegistryError
from registry.refs import validate_alias, validate_name
from registry.serve_cache import IndexFollower
from registry.serve_reads import (ERROR_STATUS, FILES, AdapterFiles, FastReads, Reads, ReplyResponse,
                                  parse_range, tar_size)

__all__ = ["create_app", "serve", "uvicorn_options", "ServerThread", "read_tar", "parse_range", "tar_size"]

log = logging.getLogger("registry.server")

MAX_BODY_BYTES = 1 << 20
READ_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def _json_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
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
                return await _json_error(400, "invalid Content-Length header")(scope, receive, send)
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
                return _json_error(403, "writes are disabled: start the server with REGISTRY_TOKEN set")
            return _json_error(403, "reads are protected but the server has no REGISTRY_TOKEN")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            what = "writes need" if write else "this server protects reads: requests need"
            return _json_error(401, f"{what} an 'Authorization: Bearer <token>' header",
                               {"WWW-Authenticate": 'Bearer realm="registry"'})
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return _json_error(403, "wrong token")
        return None

    async def _too_large(self, scope, receive, send):
        return await _json_error(413, f"request body over the limit of {self.max_body_bytes} bytes")(
            scope, receive, send)


# --------------------------------------------------------------------------------------------
# Request bodies
# --------------------------------------------------------------------------------------------

Prompts = Annotated[list[Annotated[str, Field(min_length=1, max_length=10_000)]],
                    Field(min_length=1, max_length=1000, description="A task's sample prompts.")]


class AliasBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=1, description="The version of NAME the alias points at.")


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: Prompts
    name: str = Field(description="Name to store the generated adapter under.")
    generator: str | None = Field(None, description="REF of a trained generator (default: the latest).")
    task: str | None = Field(None, max_length=128, description="Task name recorded on the new adapter.")


class ComposeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: Prompts
    name: str = Field(description="Name to store the composed adapter under.")
    k: int = Field(3, ge=1, le=50, description="How many nearest adapters to compose.")
    strategy: str = Field("mixture", max_length=64, description="Composition strategy (mixture, fusion, ...).")
    task: str | None = Field(None, max_length=128, description="Task name recorded on the new adapter.")
    exclude_tasks: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=list, max_length=100, description="Leave these tasks' adapters out of retrieval.")


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _service(module_name: str, function_name: str, what: str):
    """The generate/compose backend, imported per request so it appears once someone installs it."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise _Unavailable(f"{what} is not available on this server: {module_name}.{function_name} "
                               "is not installed") from None
        raise
    function = getattr(module, function_name, None)
    if function is None:
        raise _Unavailable(f"{what} is not available on this server: {module_name} has no {function_name}")
    return function


class _Unavailable(Exception):
    """A write endpoint whose backend is not installed (501)."""


def _result_dict(result: Any) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if hasattr(result, "adapter") and hasattr(result.adapter, "to_dict"):
        return result.adapter.to_dict()
    if isinstance(result, dict):
        return result
    raise RegistryError(f"the backend returned {type(result).__name__}, not an adapter record")


def create_app(registry=None, *, home: str | os.PathLike | None = None, token: str | None = None,
               protect_reads: bool | None = None, max_body_bytes: int = MAX_BODY_BYTES, fast_reads: bool = True):
    """The ASGI app. ``registry`` (a ``Registry``) or ``home`` says what to serve; ``token``
    defaults to ``$REGISTRY_TOKEN`` and ``protect_reads`` to ``$REGISTRY_PROTECT_READS``.

    ``fast_reads=False`` leaves the hot reads to the FastAPI routes (same answers, slower: the
    tests compare the two).
    """
    if registry is None:
        from registry.store import Registry

        registry = Registry.open(home)
    token = token if token is not None else os.environ.get("REGISTRY_TOKEN")
    if protect_reads is None:
        protect_reads = _truthy(os.environ.get("REGISTRY_PROTECT_READS"))
    reads = Reads(registry, AdapterFiles(registry), protect_reads)
    follower = IndexFollower(registry, reads.stamp)
    model_lock = threading.Lock()  # one search/generate/compose at a time: they share the FAISS index
    bearer = HTTPBearer(auto_error=False, description="The server's REGISTRY_TOKEN.")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        reads.close()  # the change-stamp connection; reopened if the app is used again

    app = FastAPI(
        title="LoRA adapter registry",
        version="1",
        description=__doc__.split("\n\n", 1)[0] + "\n\nErrors are JSON bodies `{\"error\": \"...\"}`.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.reads = reads
    app.state.index_follower = follower
    if fast_reads:
        app.add_middleware(FastReads, reads=reads)
    # added last, so outermost: the token is checked before the fast reads too
    app.add_middleware(GuardMiddleware, token=token, protect_reads=protect_reads, max_body_bytes=max_body_bytes)
    read_security = [Security(bearer)] if protect_reads else []  # enforced by GuardMiddleware;
    write_security = [Security(bearer)]  # declared here so /docs shows which endpoints need it

    # -- errors: always {"error": ...} ------------------------------------------------------------
    @app.exception_handler(RegistryError)
    async def _registry_error(_request, err: RegistryError):
        status = next(code for cls, code in ERROR_STATUS if isinstance(err, cls))
        if status >= 500:
            log.error("integrity problem: %s", err)
        return _json_error(status, str(err))

    @app.exception_handler(_Unavailable)
    async def _unavailable(_request, err: _Unavailable):
        return _json_error(501, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return _json_error(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid")
            ctx = (detail.get("ctx") or {}).get("error", "")
            return _json_error(400, f"malformed JSON body{': ' + str(ctx) if ctx else ''}")
        parts = []
        for problem in problems[:5]:
            where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
        return _json_error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        log.exception("unexpected error")
        return _json_error(500, f"internal error ({type(err).__name__}); see the server log")

    def request_dict(request: Request) -> dict:
        wanted = {"method": request.method}
        for key in ("range", "if-range", "if-none-match"):
            if key in request.headers:
                wanted[key] = request.headers[key]
        return wanted

    # -- reads ----------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["meta"])
    async def healthz():
        """Liveness: 200 while the server runs (never token-protected)."""
        return {"ok": True}

    @app.get("/v1/adapters", tags=["read"], dependencies=read_security)
    def list_adapters(name: str | None = None, kind: str | None = None, task: str | None = None,
                      tag: str | None = None, base_model: str | None = None):
        """Adapter versions, optionally filtered."""
        adapters = registry.list_adapters(name=name, kind=kind, task=task, tag=tag, base_model=base_model)
        return JSONResponse([a.to_dict() for a in adapters])

    @app.get("/v1/search", tags=["read"], dependencies=read_security)
    def search(q: Annotated[list[str], Query(description="A prompt (repeat for several: their mean is searched).")],
               k: Annotated[int, Query(ge=1, le=100)] = 5, base_model: str | None = None,
               kind: str | None = None, exclude_task: Annotated[list[str], Query()] = []):
        """The adapters whose sample prompts are nearest to the prompt(s)."""
        with model_lock:
            follower.catch_up()  # adds/removals other processes made since the last change, only those
            hits = registry.search(q if len(q) > 1 else q[0], k=k, base_model=base_model, kind=kind,
                                   exclude_tasks=exclude_task)
        return JSONResponse([{"score": h.score, **h.adapter.to_dict()} for h in hits])

    # The four routes below are answered by FastReads before FastAPI routes anything; they stay for
    # /docs and for fast_reads=False, and give the same answers through the same Reads methods.
    @app.get("/v1/adapters/{ref}", tags=["read"], dependencies=read_security)
    async def show(ref: str):
        """Metadata of the version REF resolves to, with its lineage (parents and children)."""
        return ReplyResponse(await reads.metadata(ref))

    @app.get("/v1/adapters/{ref}/prompts", tags=["read"], dependencies=read_security)
    async def prompts(ref: str):
        """The sample prompts stored with the adapter."""
        return ReplyResponse(await reads.prompts(ref))

    @app.head("/v1/adapters/{ref}/files/{file_name}", include_in_schema=False)
    @app.get("/v1/adapters/{ref}/files/{file_name}", tags=["read"], dependencies=read_security,
             responses={200: {"description": "the file"}, 206: {"description": "a byte range"},
                        304: {"description": "not modified"}, 416: {"description": "bad range"}})
    async def get_file(ref: str, file_name: str, request: Request):
        """One file of the PEFT directory; ETag = its sha256; conditional GET and single Range."""
        return ReplyResponse(await reads.file(ref, file_name, request_dict(request)))

    @app.head("/v1/adapters/{ref}/archive", include_in_schema=False)
    @app.get("/v1/adapters/{ref}/archive", tags=["read"], dependencies=read_security,
             responses={200: {"description": "an uncompressed tar"}})
    async def get_archive(ref: str, request: Request):
        """The PEFT directory (both files, at the archive's top level) as one uncompressed tar."""
        return ReplyResponse(await reads.archive(ref, request_dict(request)))

    # -- writes ---------------------------------------------------------------------------------------
    @app.put("/v1/adapters/{name}/aliases/{alias}", tags=["write"], dependencies=write_security)
    def put_alias(name: str, alias: str, body: Annotated[AliasBody, Body()]):
        """Point NAME@ALIAS at NAME@VERSION (creating or moving the alias)."""
        validate_name(name)
        validate_alias(alias)
        info = registry.set_alias(f"{name}@{body.version}", alias)
        return JSONResponse(info.to_dict(), headers={"X-Registry-Ref": info.ref, "X-Registry-Digest": info.digest})

    def created(data: dict):
        headers = {"Location": f"/v1/adapters/{quote(data.get('ref', ''), safe='@')}"}
        if data.get("digest"):
            headers["X-Registry-Digest"] = data["digest"]
        return JSONResponse(data, status_code=201, headers=headers)

    @app.post("/v1/generate", tags=["write"], dependencies=write_security, status_code=201,
              responses={501: {"description": "no generator backend installed"}})
    def generate(body: GenerateBody):
        """Generate an adapter from a task's prompts (Drag-and-Drop) and store it as NAME."""
        validate_name(body.name)
        function = _service("generator.service", "generate_adapter", "generation")
        extra = {"task": body.task} if body.task else {}
        with model_lock:
            result = function(registry, body.prompts, name=body.name, generator_ref=body.generator, **extra)
        return created(_result_dict(result))

    @app.post("/v1/compose", tags=["write"], dependencies=write_security, status_code=201,
              responses={501: {"description": "no retrieval backend installed"}})
    def compose(body: ComposeBody):
        """Retrieve the k nearest adapters to the prompts, compose them, and store the result as NAME."""
        validate_name(body.name)
        function = _service("retrieval.service", "compose_adapter", "composition")
        extra = {"task": body.task} if body.task else {}
        if body.exclude_tasks:
            extra["exclude_tasks"] = body.exclude_tasks
        with model_lock:
            follower.catch_up()  # retrieval searches the index: see what other processes added
            result = function(registry, body.prompts, k=body.k, strategy=body.strategy, name=body.name, **extra)
        return created(_result_dict(result))

    from registry.web import mount_pages  # the browser pages at / (registry/web/), read-only
    mount_pages(app, registry, reads=reads, follower=follower, model_lock=model_lock, protect_reads=protect_reads,
                token=token)
    return app


def uvicorn_options(access_log: bool, log_level: str) -> dict:
    """How ``serve`` and ``ServerThread`` run uvicorn: uvicorn's HTTP/1.1 protocol with zero-copy
    file sends (``registry.serve_http``; httptools when installed, else h11), the default asyncio
    loop (uvloop when installed: ``loop="auto"``), one worker (the FAISS index and the models live
    in the process; a second worker would load them twice on a 2-core machine for little gain),
    and the access log as asked (``registry serve --no-access-log`` for speed)."""
    from registry.serve_http import protocol_class

    return {"http": protocol_class() or "auto", "loop": "auto", "access_log": access_log, "log_level": log_level}


def serve(home: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8080, *,
          protect_reads: bool | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          access_log: bool = True, log_level: str = "info") -> None:
    """Run the server until interrupted (what ``registry serve`` calls)."""
    import uvicorn

    app = create_app(home=home, protect_reads=protect_reads, max_body_bytes=max_body_bytes)
    options = uvicorn_options(access_log, log_level)
    config = uvicorn.Config(app, host=host, port=port, **options)  # also sets up uvicorn's logging
    protocol = options["http"]
    logging.getLogger("uvicorn.error").info(
        "protocol: %s", f"{protocol.__name__} (zero-copy sendfile)" if isinstance(protocol, type)
        else f"uvicorn {protocol} (no zero-copy: this uvicorn lacks the classes registry.serve_http extends)")
    server = uvicorn.Server(config)
    try:
        server.run()
        if not server.started:
            raise SystemExit(3)  # as uvicorn.run: the socket could not be bound (the error is logged)
    finally:
        app.state.reads.close()
        app.state.registry.close()


class ServerThread:
    """Run an ASGI app with uvicorn in a background thread on a free loopback port (tests, benchmarks).

        with ServerThread(create_app(reg)) as url:
            fetch(url, "math@prod", cache)

    ``zero_copy=False`` runs uvicorn's own protocol (no ``http.response.zerocopysend``).
    """

    def __init__(self, app, host: str = "127.0.0.1", zero_copy: bool = True):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, 0))
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        options = uvicorn_options(access_log=False, log_level="warning")
        if not zero_copy:
            options["http"] = "auto"
        config = uvicorn.Config(app, lifespan="off", **options)
        self.app = app
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()
        reads = getattr(getattr(self.app, "state", None), "reads", None)
        if reads is not None:
            reads.close()  # the change-stamp connection (lifespan is off here)


def read_tar(data: bytes) -> dict[str, bytes]:
    """The files of an archive from ``/archive`` (used by tests and the load benchmark)."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive.getmembers():
            if not member.isfile() or member.name not in FILES:
                raise IntegrityError(f"unexpected archive member {member.name!r}")
            out[member.name] = archive.extractfile(member).read()
    return out
