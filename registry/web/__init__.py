"""Browser pages for ``registry serve``: adapters, search, one adapter's page, generators, bench
reports. Server-rendered (Jinja2, autoescaped), read-only, no build step, no CDN; the CSS and the
one small script ship as package data. ``mount_pages`` adds them to the server's app; ``auth``
says how a browser passes the token when reads are protected."""

from registry.web.pages import mount_pages

__all__ = ["mount_pages"]
