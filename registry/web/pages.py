"""The HTML pages of ``registry serve`` (server-rendered with Jinja2, autoescaped; read-only).

    GET /                         the adapters, filtered (kind, task, family, base model, tag) and paged
    GET /adapters/{ref}           one adapter: metadata, versions, aliases, digest, prompts, metrics,
                                  lineage graph, how to fetch it
    GET /search?q=TEXT&k=5        the nearest adapters with their scores, as ``registry search`` lists
                                  them (one per name; ``&all_versions=1`` for every version)
    GET /generators               the trained generators, their training tasks and loss curves
    GET /bench[?report=ID]        the latest bench report's tables and plots (or the one named)
    GET /bench/files/{png}?report=ID  a plot of a report

Everything is read through the same ``Registry`` / ``Reads`` the JSON API uses; nothing here
writes. Bad input answers an HTML error page with the API's status (400 malformed REF or query,
404 unknown adapter/page), never a traceback. Every page is sent with a Content-Security-Policy
that allows scripts and styles from ``/-/static/`` only, on top of Jinja2's autoescaping.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response

from registry.errors import RegistryError
from registry.refs import NAME_PATTERN
from registry.serve_reads import ERROR_STATUS
from registry.web.figures import lineage_graph, loss_curve

log = logging.getLogger("registry.server")

KINDS = ("harvested", "imported", "generated", "composed")
PER_PAGE, MAX_PER_PAGE = 50, 500
MAX_K = 100
MAX_QUERY_CHARS = 10_000
REPORT_FILE = "report.json"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")


class PageError(Exception):
    """Bad input to a page: shown as an HTML error page with ``status``."""

    def __init__(self, status: int, title: str, message: str):
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("registry.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False, sort_keys=True, default=str)
    env.filters["score"] = lambda v: f"{v:.4f}"
    env.filters["short"] = lambda v, n=12: (v or "")[:n]
    env.filters["size"] = _human_size
    env.filters["metric"] = _metric_text
    env.filters["refurl"] = lambda ref: "/adapters/" + quote(ref, safe="@:")
    return env


def _human_size(n) -> str:
    n = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _metric_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    return str(value)


class Renderer:
    def __init__(self, protect_reads: bool):
        self.env = _environment()
        self.protect_reads = protect_reads

    def page(self, template: str, status: int = 200, headers: dict | None = None, **context) -> HTMLResponse:
        html = self.env.get_template(template).render(protect_reads=self.protect_reads, **context)
        response = HTMLResponse(html, status_code=status, headers=headers)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store" if self.protect_reads else "no-cache"
        return response

    def error(self, status: int, title: str, message: str, *, ask_token: bool = False,
              headers: dict | None = None) -> HTMLResponse:
        return self.page("error.html", status=status, headers=headers, nav="", title=title, status_code=status,
                         message=message, ask_token=ask_token)


# --------------------------------------------------------------------------------------------
# Query parsing: every malformed value is a 400 page, never a validation traceback
# --------------------------------------------------------------------------------------------


def _one(request: Request, key: str) -> str | None:
    values = request.query_params.getlist(key)
    if len(values) > 1:
        raise PageError(400, "Bad query", f"give {key!r} once, not {len(values)} times")
    value = values[0].strip() if values else None
    return value or None


def _int(request: Request, key: str, default: int, low: int, high: int) -> int:
    text = _one(request, key)
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise PageError(400, "Bad query", f"{key} must be a whole number from {low} to {high}, not {text!r}")
    return int(text)


def _kind(request: Request) -> str | None:
    kind = _one(request, "kind")
    if kind is not None and kind not in KINDS:
        raise PageError(400, "Bad query", f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    return kind


def _flag(request: Request, key: str) -> bool:
    value = _one(request, key)
    if value not in (None, "1", "0"):
        raise PageError(400, "Bad query", f"{key} is 1 or 0, not {value!r}")
    return value == "1"


def search_hits(registry, query, k: int, all_versions: bool, **filters) -> list:
    """What ``registry search`` lists (``registry.search.search_per_adapter``, the CLI's rule too)."""
    from registry.search import search_per_adapter

    return search_per_adapter(registry, query, k, all_versions, **filters)


def family_of(adapter: dict) -> str | None:
    """The task family, where the adapter's record names one (its own field, or its recipe's)."""
    if adapter.get("family"):
        return str(adapter["family"])
    recipe = adapter.get("recipe") or {}
    for key in ("family", "task_family"):
        if recipe.get(key):
            return str(recipe[key])
    task = recipe.get("task")
    if isinstance(task, dict) and task.get("family"):
        return str(task["family"])
    return None


def _query_string(**params) -> str:
    return urlencode([(k, v) for k, v in params.items() if v not in (None, "")])


# --------------------------------------------------------------------------------------------
# Bench reports on disk (what evaluation.report.write_report writes: report.json + *.png)
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    id: str  # its folder relative to the reports folder, "/"-separated ("." for the folder itself)
    directory: Path
    mtime: float


def find_reports(root: Path, depth: int = 3) -> list[Report]:
    """Report folders under ``root`` (newest first): those holding a ``report.json``."""
    found = []
    if not root.is_dir():
        return found
    for level in range(depth + 1):
        for path in root.glob("/".join(["*"] * level + [REPORT_FILE])):
            if path.is_file() and not path.is_symlink():
                relative = path.parent.relative_to(root).as_posix()
                found.append(Report(relative, path.parent, path.stat().st_mtime))
    return sorted(found, key=lambda r: (-r.mtime, r.id))


def _report_context(report: Report) -> dict:
    try:
        data = json.loads((report.directory / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PageError(500, "Unreadable report", f"{report.id}/{REPORT_FILE} could not be read: {err}") from None
    if not isinstance(data, dict):
        raise PageError(500, "Unreadable report", f"{report.id}/{REPORT_FILE} is not a JSON object")
    rows = [r for r in data.get("rows") or [] if isinstance(r, dict)]
    means = data.get("means") if isinstance(data.get("means"), dict) else {}
    methods = list(means) or sorted({str(r.get("method")) for r in rows})
    tasks = sorted({str(r.get("task")) for r in rows})
    cells = {(str(r.get("task")), str(r.get("method"))): r for r in rows}
    plots = sorted(p.name for p in report.directory.glob("*.png") if p.is_file())
    return {"data": data, "methods": methods, "tasks": tasks, "cells": cells, "means": means,
            "plots": plots, "settings": data.get("settings") if isinstance(data.get("settings"), dict) else {},
            "notes": [str(n) for n in data.get("notes") or []]}


# --------------------------------------------------------------------------------------------
# The routes
# --------------------------------------------------------------------------------------------


class ListCache:
    """The adapter list the pages filter, reloaded only after a commit (the server's change stamp:
    one tiny query per request instead of reading every row, its tags, aliases and lineage)."""

    def __init__(self, registry, stamp):
        self.registry = registry
        self.stamp = stamp
        self._entry = None  # (stamp, [adapter dicts])
        self._lock = threading.Lock()

    def adapters(self) -> list[dict]:
        stamp = self.stamp.read()  # before the SQL: a commit racing the load makes the next read reload
        entry = self._entry
        if entry is not None and self.stamp.cheap and entry[0] == stamp:
            return entry[1]
        adapters = [a.to_dict() for a in self.registry.list_adapters()]
        for a in adapters:
            a["family"] = family_of(a)
        with self._lock:
            self._entry = (stamp, adapters)
        return adapters


def _guarded(renderer: Renderer, handler):
    """An async page handler whose failures are HTML pages: PageError and RegistryError with their
    status (400/404), anything else a plain 500 page (the traceback goes to the log only)."""

    @functools.wraps(handler)
    async def wrapper(request: Request, **kwargs) -> Response:
        try:
            return await handler(request, **kwargs)
        except PageError as err:
            return renderer.error(err.status, err.title, err.message)
        except RegistryError as err:
            status = next(code for cls, code in ERROR_STATUS if isinstance(err, cls))
            if status >= 500:
                log.error("integrity problem: %s", err)
            title = {400: "Bad reference", 404: "Not found"}.get(status, "Registry error")
            return renderer.error(status, title, str(err))
        except Exception as err:
            log.exception("unexpected error on %s", request.url.path)
            return renderer.error(500, "Internal error", f"internal error ({type(err).__name__}); see the server log")

    return wrapper


def mount_pages(app, registry, *, reads, follower, model_lock, protect_reads: bool, token: str | None,
                reports_dir: str | os.PathLike | None = None) -> None:
    """Add the pages to the server's FastAPI ``app`` (one call in the app factory).

    ``reads`` is the server's ``Reads`` (metadata and lineage as the API answers them),
    ``follower`` and ``model_lock`` are what ``/v1/search`` uses, so a page search gives the same
    hits. ``reports_dir`` (default ``$REGISTRY_REPORTS_DIR``, else ``./reports``) is where bench
    reports are looked for.
    """
    from starlette.staticfiles import StaticFiles

    from registry.web.auth import PageAuth

    renderer = Renderer(protect_reads)
    listing = ListCache(registry, reads.stamp)
    reports_root = Path(reports_dir or os.environ.get("REGISTRY_REPORTS_DIR") or "reports").expanduser().resolve()
    static = StaticFiles(packages=[("registry.web", "static")])
    app.add_middleware(PageAuth, token=token, protect_reads=protect_reads, static=static,
                       render_error=renderer.error)  # added after the guard, so outside it

    def route(path: str, handler):
        app.add_api_route(path, _guarded(renderer, handler), methods=["GET"], include_in_schema=False,
                          response_class=HTMLResponse)

    # -- the list ---------------------------------------------------------------------------
    async def adapters_page(request: Request) -> Response:
        kind, task, family = _kind(request), _one(request, "task"), _one(request, "family")
        base_model, tag = _one(request, "base_model"), _one(request, "tag")
        page = _int(request, "page", 1, 1, 10**9)
        per_page = _int(request, "per_page", PER_PAGE, 1, MAX_PER_PAGE)
        everything = await run_in_threadpool(listing.adapters)
        chosen = [a for a in everything
                  if (kind is None or a["kind"] == kind) and (task is None or a["task"] == task)
                  and (family is None or a["family"] == family)
                  and (base_model is None or a["base_model"] == base_model)
                  and (tag is None or tag in a["tags"])]
        pages = max(1, math.ceil(len(chosen) / per_page))
        if page > pages:
            raise PageError(404, "No such page", f"page {page} of {pages}: there are {len(chosen)} matching adapters")
        filters = {"kind": kind, "task": task, "family": family, "base_model": base_model, "tag": tag}
        link = lambda p: "/?" + _query_string(**filters, page=p, per_page=per_page if per_page != PER_PAGE else None)
        options = {
            "kind": list(KINDS),
            "task": sorted({a["task"] for a in everything if a["task"]}),
            "family": sorted({a["family"] for a in everything if a["family"]}),
            "base_model": sorted({a["base_model"] for a in everything}),
            "tag": sorted({t for a in everything for t in a["tags"]}),
        }
        return renderer.page(
            "adapters.html", nav="adapters", title="Adapters", adapters=chosen[(page - 1) * per_page: page * per_page],
            total=len(chosen), all_count=len(everything), page=page, pages=pages, per_page=per_page,
            filters=filters, options=options, show_family=bool(options["family"]),
            prev_url=link(page - 1) if page > 1 else None, next_url=link(page + 1) if page < pages else None)

    route("/", adapters_page)
    route("/adapters", adapters_page)

    # -- one adapter ------------------------------------------------------------------------
    async def adapter_page(request: Request, ref: str) -> Response:
        if "/" in ref:
            raise PageError(400, "Bad reference", f"invalid REF {ref!r}: a REF has no '/' "
                            "(name, name@3, name@alias or sha256:<digest>)")
        meta = json.loads((await reads.metadata(ref)).body)  # InvalidName -> 400, NotFound -> 404
        meta["family"] = family_of(meta)

        def load():
            return registry.list_adapters(name=meta["name"], include_removed=True), registry.prompts(meta["ref"])

        versions, prompts = await run_in_threadpool(load)
        lineage = meta.get("lineage") or {"parents": [], "children": []}
        graph = lineage_graph(meta["ref"], lineage["parents"], lineage["children"])
        base_url = str(request.base_url).rstrip("/")
        return renderer.page(
            "adapter.html", nav="adapters", title=meta["ref"], a=meta, asked=ref, versions=versions,
            prompts=prompts, graph=graph, lineage=lineage, base_url=base_url,
            recipe_json=json.dumps(meta.get("recipe") or {}, indent=2, ensure_ascii=False, sort_keys=True, default=str))

    route("/adapters/{ref:path}", adapter_page)

    # -- search -----------------------------------------------------------------------------
    async def search_page(request: Request) -> Response:
        queries = [q.strip() for q in request.query_params.getlist("q") if q.strip()]  # none: just the form
        k = _int(request, "k", 5, 1, MAX_K)
        kind = _kind(request)
        base_model = _one(request, "base_model")
        exclude = [t for t in request.query_params.getlist("exclude_task") if t.strip()]
        if sum(len(q) for q in queries) > MAX_QUERY_CHARS:
            raise PageError(400, "Bad query", f"the search query is over {MAX_QUERY_CHARS} characters")
        hits, base_models = None, sorted({a["base_model"] for a in await run_in_threadpool(listing.adapters)})
        if base_model is not None and base_model not in base_models:
            raise PageError(400, "Bad query", f"no stored adapter has the base model {base_model!r}")
        all_versions = _flag(request, "all_versions")
        if queries:
            def run():
                with model_lock:
                    follower.catch_up()
                    return search_hits(registry, queries if len(queries) > 1 else queries[0], k, all_versions,
                                       base_model=base_model, kind=kind, exclude_tasks=exclude)

            hits = [{"score": h.score, **h.adapter.to_dict()} for h in await run_in_threadpool(run)]
            for hit in hits:
                hit["family"] = family_of(hit)
        return renderer.page("search.html", nav="search", title="Search", queries=queries, k=k, kind=kind,
                             kinds=KINDS, base_model=base_model, base_models=base_models, exclude=exclude, hits=hits,
                             all_versions=all_versions)

    route("/search", search_page)

    # -- generators -------------------------------------------------------------------------
    async def generators_page(request: Request) -> Response:
        def load():
            artifacts = [a.to_dict() for a in registry.list_artifacts()]
            generated = registry.list_adapters(kind="generated")
            return artifacts, generated

        artifacts, generated = await run_in_threadpool(load)
        for artifact in artifacts:
            meta = artifact["meta"] if isinstance(artifact.get("meta"), dict) else {}
            artifact["curve"] = loss_curve(meta.get("loss_curve") or [])
            artifact["made"] = [a.ref for a in generated
                                if a.recipe.get("generator") == artifact["ref"]
                                or a.recipe.get("generator_digest") == artifact["sha256"]]
            artifact["training"] = meta.get("training") if isinstance(meta.get("training"), dict) else {}
        return renderer.page("generators.html", nav="generators", title="Generators", artifacts=artifacts)

    route("/generators", generators_page)

    async def no_generator_page(request: Request, rest: str) -> Response:
        raise PageError(404, "Not found", "generators are listed on one page: /generators")

    route("/generators/{rest:path}", no_generator_page)

    # -- bench reports ----------------------------------------------------------------------
    def pick_report(wanted: str | None) -> tuple[Report | None, list[Report]]:
        reports = find_reports(reports_root)
        if wanted is None:
            return (reports[0] if reports else None), reports
        for report in reports:
            if report.id == wanted:
                return report, reports
        raise PageError(404, "No such report", f"no bench report {wanted!r} under {reports_root}")

    async def bench_page(request: Request) -> Response:
        report, reports = await run_in_threadpool(pick_report, _one(request, "report"))
        context = await run_in_threadpool(_report_context, report) if report else {}
        return renderer.page("bench.html", nav="bench", title="Bench reports", report=report, reports=reports,
                             root=str(reports_root), **context)

    route("/bench", bench_page)

    async def bench_file(request: Request, file_name: str) -> Response:
        if not file_name.endswith(".png") or not NAME_PATTERN.match(file_name) or ".." in file_name:
            raise PageError(400, "Bad file name", f"only a report's .png plots are served, not {file_name!r}")
        report, _ = await run_in_threadpool(pick_report, _one(request, "report") or ".")
        path = report.directory / file_name
        if not path.is_file():
            raise PageError(404, "Not found", f"report {report.id!r} has no {file_name}")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-cache",
                                                                   "X-Content-Type-Options": "nosniff"})

    route("/bench/files/{file_name:path}", bench_file)
