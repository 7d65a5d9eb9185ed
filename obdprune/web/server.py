"""A local static server for exported pages, with the headers that let WebAssembly use threads.

Browsers give a page ``SharedArrayBuffer`` (which wasm threads need) only when it is cross-origin
isolated: the page must be sent with ``Cross-Origin-Opener-Policy: same-origin`` and
``Cross-Origin-Embedder-Policy: require-corp``. Any other static server works too; the page then runs
on one thread and says so.
"""
from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from obdprune.errors import UsageError

__all__ = ["ISOLATION_HEADERS", "make_server", "start_server", "serve", "url_of"]

ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
HOST = "127.0.0.1"


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".wasm": "application/wasm",
                      ".mjs": "text/javascript", ".js": "text/javascript", ".json": "application/json",
                      ".onnx": "application/octet-stream", ".bin": "application/octet-stream"}

    def __init__(self, *args, isolate: bool = True, quiet: bool = True, **kwargs):
        self._isolate, self._quiet = isolate, quiet
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        if self._isolate:
            for k, v in ISOLATION_HEADERS.items():
                self.send_header(k, v)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if not self._quiet:
            super().log_message(format, *args)


def make_server(folder: str | Path, port: int = 8000, *, isolate: bool = True, quiet: bool = True,
                host: str = HOST) -> ThreadingHTTPServer:
    """A server for ``folder`` bound to ``host`` (loopback by default); port 0 picks a free port.

    ``isolate`` sends the cross-origin isolation headers (wasm threads); without them a page gets one thread.
    """
    folder = Path(folder)
    if not (folder / "index.html").is_file():
        raise UsageError(f"{folder} holds no index.html; write a page with: obdprune export RUN --format web --out {folder}")
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be in [0, 65535], got {port}")
    handler = functools.partial(_Handler, directory=str(folder), isolate=isolate, quiet=quiet)
    try:
        return ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/"


def start_server(folder: str | Path, port: int = 0, *, isolate: bool = True) -> tuple[ThreadingHTTPServer, str]:
    """:func:`make_server` running in a daemon thread; returns the server (``shutdown()`` it) and its URL.

    Example:
        >>> server, url = start_server("web/fast")   # doctest: +SKIP
        >>> server.shutdown(); server.server_close()  # doctest: +SKIP
    """
    server = make_server(folder, port, isolate=isolate)
    threading.Thread(target=server.serve_forever, name="obdprune-serve", daemon=True).start()
    return server, url_of(server)


def serve(folder: str | Path, port: int = 8000, *, isolate: bool = True, announce=print) -> None:
    """Serve ``folder`` on 127.0.0.1 until interrupted; ``announce`` gets the URL once listening."""
    server = make_server(folder, port, isolate=isolate, quiet=False)
    try:
        announce(f"serving {Path(folder)} at {url_of(server)} (Ctrl-C stops)")
        server.serve_forever()
    finally:
        server.server_close()
