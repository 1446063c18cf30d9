"""Commands for fetching over HTTP: run the server, pull from one, keep a vLLM directory in sync."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cli.app import HomeOption, JsonOption, app, console_stderr, print_json

ServerOption = Annotated[str, typer.Option("--server", help="Base URL of a `registry serve` server, e.g. http://127.0.0.1:8080.", envvar="REGISTRY_SERVER", show_envvar=False)]
CacheOption = Annotated[Optional[Path], typer.Option("--cache-dir", help="Client cache (default: $REGISTRY_CLIENT_CACHE or ~/.cache/lora-registry/client).", file_okay=False)]


def backends() -> dict:
    """The generate and compose backends ``registry serve`` builds the app with: the HTTP app lives in
    ``registry``, which imports neither ``generator`` nor ``retrieval``; this layer hands them in."""
    from generator.service import generate_adapter
    from retrieval.service import compose_adapter

    return {"generate": generate_adapter, "compose": compose_adapter}


def _token() -> str | None:
    import os

    return os.environ.get("REGISTRY_TOKEN")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8080,
    protect_reads: Annotated[bool, typer.Option("--protect-reads", help="Require the bearer token on reads too (also $REGISTRY_PROTECT_READS=1).")] = False,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 above).")] = 1 << 20,
    access_log: Annotated[bool, typer.Option(help="Log every request.")] = True,
    redirect_downloads: Annotated[bool, typer.Option("--redirect-downloads", help="Answer weights downloads with a redirect to a presigned object-store URL (S3 blob store only).")] = False,
    home: HomeOption = None,
):
    """Serve the registry over HTTP (OpenAPI docs at /docs). Writes need $REGISTRY_TOKEN as a bearer token."""
    import os

    from registry.errors import RegistryError
    from registry.http.app import serve as run_server

    token = _token()
    protect = protect_reads or None  # None: fall back to $REGISTRY_PROTECT_READS
    if (protect_reads or os.environ.get("REGISTRY_PROTECT_READS", "").lower() in {"1", "true", "yes", "on"}) \
            and not token:
        raise RegistryError("--protect-reads needs REGISTRY_TOKEN to be set")
    err = console_stderr()
    if redirect_downloads and not (os.environ.get("REGISTRY_BLOB_URL") or "").startswith("s3://"):
        raise RegistryError("--redirect-downloads needs an S3 blob store (REGISTRY_BLOB_URL=s3://bucket/prefix)")
    if not token:
        err.print("REGISTRY_TOKEN is not set: writes (alias moves, generate, compose) are refused")
    err.print(f"serving on http://{host}:{port} (docs at http://{host}:{port}/docs)")
    run_server(home, host, port, protect_reads=protect, max_body_bytes=max_body_bytes, access_log=access_log,
               redirect_downloads=redirect_downloads, **backends())


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="name, name@3, name@prod or sha256:<digest>")],
    server: ServerOption,
    cache_dir: CacheOption = None,
    json_output: JsonOption = False,
):
    """Download a verified PEFT directory from a server into the client cache and print its path."""
    from registry.client import fetch_adapter

    fetched = fetch_adapter(server, ref, cache_dir, _token())
    if json_output:
        print_json(fetched.to_dict())
    else:
        print(fetched.path)


@app.command()
def sync(
    refs: Annotated[list[str], typer.Argument(help="Adapters to keep in the directory (e.g. name@prod).")],
    server: ServerOption,
    vllm: Annotated[Path, typer.Option("--vllm", help="Resolver directory: <DIR>/<name>/adapter_config.json.", file_okay=False)],
    cache_dir: CacheOption = None,
    json_output: JsonOption = False,
):
    """Bring a vLLM/LoRAX resolver directory up to date with REFs on a server (only changed ones are rewritten)."""
    from registry.client import sync_vllm

    results = sync_vllm(server, refs, vllm, cache_dir, _token())
    if json_output:
        print_json(results)
    else:
        for item in results:
            state = "updated" if item["changed"] else "unchanged"
            print(f"{item['path']}\t{item['ref']}\tsha256:{item['digest'][:12]}\t{state}")
