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

Generate and compose call the backends ``create_app`` was given (``registry serve`` passes
``generator.service.generate_adapter`` and ``retrieval.service.compose_adapter``; one such call at a
time); without one the endpoint answers 501 with a JSON error. Both answer 201 with the new
adapter's metadata and a ``Location``.

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

- the four adapter reads are answered by ``registry.http.reads.FastReads`` in front of FastAPI, from
  memory: per request one change-stamp read (``registry.http.cache.ChangeStamp``: SQLite's
  ``data_version``, PostgreSQL's current snapshot) says whether anything was committed since the
  cached answer was built; what depends only on a digest (config bytes, prompts, verified blobs)
  is kept for good; so a REF costs SQL only the first time after a change, and an alias moved by
  any process shows on the next request;
- blobs go out with ``sendfile`` through the ASGI zero-copy extension that ``registry.http.zerocopy`` adds to
  uvicorn's protocol, headers in the same TCP segment as the body;
- ``/v1/search`` and ``/v1/compose`` catch the FAISS index up only after a change, by the rows
  added since (``registry.http.cache.IndexFollower``);
- one uvicorn worker (``uvicorn_options``): the index and the models live in the process.
"""

import contextlib
import json
import logging
import os
import threading
from typing import Annotated, Any, Callable
from urllib.parse import quote

from fastapi import Body, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from registry.errors import RegistryError
from registry.http.auth import GuardMiddleware, json_error
from registry.http.cache import IndexFollower
from registry.http.files import AdapterFiles
from registry.http.reads import FastReads, Reads
from registry.http.replies import ERROR_STATUS, ReplyResponse
from registry.refs import validate_alias, validate_name

__all__ = ["create_app", "serve", "uvicorn_options"]

log = logging.getLogger("registry.server")

MAX_BODY_BYTES = 1 << 20


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


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
    gate: bool = Field(False, description="The entropy gate (generate --gate): for a generator trained on top of an "
                                          "adapter, store that adapter alone unless the generated one makes the base surer.")


class ComposeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: Prompts
    name: str = Field(description="Name to store the composed adapter under.")
    k: int = Field(3, ge=1, le=50, description="How many nearest adapters to compose.")
    strategy: str = Field("mixture", max_length=64, description="Composition strategy (mixture, fusion, ...).")
    task: str | None = Field(None, max_length=128, description="Task name recorded on the new adapter.")
    exclude_tasks: list[Annotated[str, Field(max_length=128)]] = Field(
        default_factory=list, max_length=100, description="Leave these tasks' adapters out of retrieval.")
    add: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=8,
        description="REFs added at full weight to the composition (e.g. the multitask LoRA under the selected adapter).")
    gate: bool = Field(False, description="With add: keep the composition only if it makes the base surer of its "
                                          "first answer token than the added adapters alone (compose --gate).")


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _backend(function, what: str, where: str):
    """The generate/compose backend the app was built with (``cli/serve_commands.py`` passes
    ``generator.service.generate_adapter`` and ``retrieval.service.compose_adapter``); 501 without one."""
    if function is None:
        raise _Unavailable(f"{what} is not available on this server: it was started without a backend "
                           f"(`registry serve` passes {where})")
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
               protect_reads: bool | None = None, max_body_bytes: int = MAX_BODY_BYTES, fast_reads: bool = True,
               generate: Callable | None = None, compose: Callable | None = None, redirect_downloads: bool = False):
    """The ASGI app. ``registry`` (a ``Registry``) or ``home`` says what to serve; ``token``
    defaults to ``$REGISTRY_TOKEN`` and ``protect_reads`` to ``$REGISTRY_PROTECT_READS``.

    ``generate(registry, prompts, *, name, generator_ref, task=...)`` and ``compose(registry,
    prompts, *, k, strategy, name, task=..., exclude_tasks=...)`` back ``POST /v1/generate`` and
    ``POST /v1/compose`` (each returns the new adapter's record); without one the endpoint answers
    501. The registry package never imports the generator or retrieval: the caller passes them.

    ``redirect_downloads`` answers weights downloads with a 307 to a presigned object-store URL
    (S3 blob stores only; the bytes then never pass through this process).

    ``fast_reads=False`` leaves the hot reads to the FastAPI routes (same answers, slower: the
    tests compare the two).
    """
    backends = {"generate": generate, "compose": compose}  # (the route functions below reuse the names)
    if registry is None:
        from registry.store import Registry

        registry = Registry.open(home)
    token = token if token is not None else os.environ.get("REGISTRY_TOKEN")
    if protect_reads is None:
        protect_reads = _truthy(os.environ.get("REGISTRY_PROTECT_READS"))
    reads = Reads(registry, AdapterFiles(registry), protect_reads, redirect_downloads)
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
        return json_error(status, str(err))

    @app.exception_handler(_Unavailable)
    async def _unavailable(_request, err: _Unavailable):
        return json_error(501, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return json_error(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, err: RequestValidationError):
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = next(p for p in problems if p.get("type") == "json_invalid")
            ctx = (detail.get("ctx") or {}).get("error", "")
            return json_error(400, f"malformed JSON body{': ' + str(ctx) if ctx else ''}")
        parts = []
        for problem in problems[:5]:
            where = ".".join(str(x) for x in problem.get("loc", ()) if x != "body") or "body"
            parts.append(f"{where}: {problem.get('msg', 'invalid')}")
        return json_error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _unexpected(_request, err: Exception):
        log.exception("unexpected error")
        return json_error(500, f"internal error ({type(err).__name__}); see the server log")

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
        function = _backend(backends["generate"], "generation", "generator.service.generate_adapter")
        extra = {"task": body.task} if body.task else {}
        if body.gate:
            extra["gate"] = True
        with model_lock:
            result = function(registry, body.prompts, name=body.name, generator_ref=body.generator, **extra)
        return created(_result_dict(result))

    @app.post("/v1/compose", tags=["write"], dependencies=write_security, status_code=201,
              responses={501: {"description": "no retrieval backend installed"}})
    def compose(body: ComposeBody):
        """Retrieve the k nearest adapters to the prompts, compose them, and store the result as NAME."""
        validate_name(body.name)
        function = _backend(backends["compose"], "composition", "retrieval.service.compose_adapter")
        extra = {"task": body.task} if body.task else {}
        if body.exclude_tasks:
            extra["exclude_tasks"] = body.exclude_tasks
        if body.add:
            extra["add"] = body.add
        if body.gate:
            extra["gate"] = True
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
    file sends (``registry.http.zerocopy``; httptools when installed, else h11), the default asyncio
    loop (uvloop when installed: ``loop="auto"``), one worker (the FAISS index and the models live
    in the process; a second worker would load them twice on a 2-core machine for little gain),
    and the access log as asked (``registry serve --no-access-log`` for speed)."""
    from registry.http.zerocopy import protocol_class

    return {"http": protocol_class() or "auto", "loop": "auto", "access_log": access_log, "log_level": log_level}


def serve(home: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8080, *,
          protect_reads: bool | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          access_log: bool = True, log_level: str = "info", generate: Callable | None = None,
          compose: Callable | None = None, redirect_downloads: bool = False) -> None:
    """Run the server until interrupted (what ``registry serve`` calls, with both backends)."""
    import uvicorn

    app = create_app(home=home, protect_reads=protect_reads, max_body_bytes=max_body_bytes, generate=generate,
                     compose=compose, redirect_downloads=redirect_downloads)
    options = uvicorn_options(access_log, log_level)
    config = uvicorn.Config(app, host=host, port=port, **options)  # also sets up uvicorn's logging
    protocol = options["http"]
    logging.getLogger("uvicorn.error").info(
        "protocol: %s", f"{protocol.__name__} (zero-copy sendfile)" if isinstance(protocol, type)
        else f"uvicorn {protocol} (no zero-copy: this uvicorn lacks the classes registry.http.zerocopy extends)")
    server = uvicorn.Server(config)
    try:
        server.run()
        if not server.started:
            raise SystemExit(3)  # as uvicorn.run: the socket could not be bound (the error is logged)
    finally:
        app.state.reads.close()
        app.state.registry.close()
