"""The old location of the HTTP app (now ``registry.http``): kept so imports of
``registry.server.create_app`` / ``serve`` go on working."""

from registry.http.app import create_app, serve, uvicorn_options

__all__ = ["create_app", "serve", "uvicorn_options"]
