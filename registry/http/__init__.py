"""The registry over HTTP (``registry serve``).

- ``app``: the FastAPI app (``create_app``: routes, errors, the generate/compose backends it is
  given) and ``serve`` (uvicorn, one worker);
- ``auth``: the bearer token on writes (and on reads with ``protect_reads``) and the body limit;
- ``reads``: the hot reads answered from memory in front of FastAPI (``FastReads``, ``Reads``);
- ``replies``: replies, ETag / conditional GET / Range, sending a file slice (zero-copy when offered);
- ``files``: the served files by digest (config bytes, weights blob checked once, the tar archive);
- ``cache``: the change stamp, the caches valid for one stamp, the FAISS index follower;
- ``zerocopy``: uvicorn's HTTP/1.1 protocols with an ASGI ``sendfile`` extension.
"""
