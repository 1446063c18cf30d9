"""The old location of the read path (now ``registry.http.reads`` / ``replies`` / ``files``): kept
so ``from registry.serve_reads import ERROR_STATUS`` (``registry/web/pages.py``) goes on working."""

from registry.http.files import FILES, AdapterFiles, tar_size
from registry.http.reads import FastReads, Reads
from registry.http.replies import ERROR_STATUS, ReplyResponse, parse_range

__all__ = ["ERROR_STATUS", "FILES", "AdapterFiles", "FastReads", "Reads", "ReplyResponse", "parse_range", "tar_size"]
