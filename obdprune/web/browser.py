"""Open an exported page in headless Chromium and read back what it measured.

Chromium is the system browser (Debian's ``chromium`` package), driven by Playwright for Python; no
browser build is ever downloaded (``playwright install`` is never needed).
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from obdprune.errors import ObdpruneError, UsageError
from obdprune.web.server import start_server

__all__ = ["find_chromium", "measure_in_browser", "open_page", "CHROMIUM_ARGS"]

CHROMIUM_ARGS = ["--no-sandbox"]  # the sandbox needs user namespaces, which containers and root shells lack
_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str:
    """Path of the system Chromium: ``$OBDPRUNE_CHROMIUM``, else the usual Debian/Ubuntu locations."""
    env = os.environ.get("OBDPRUNE_CHROMIUM")
    for cand in ([env] if env else []) + list(_CANDIDATES) + [shutil.which("chromium") or ""]:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    raise UsageError("no Chromium found; install Debian's: apt-get install chromium (or set OBDPRUNE_CHROMIUM)")


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UsageError("browser measurements need Playwright for Python: pip install playwright "
                         "(the system Chromium is used; no 'playwright install')") from None
    return sync_playwright


class open_page:
    """Context manager: serve ``folder``, open it in headless Chromium, yield the Playwright page.

    ``query`` is appended to the URL (``repeats=30&threads=1``); ``isolate`` sends the headers that
    allow wasm threads. ``page.browser_version`` holds Chromium's version.

    Example:
        >>> with open_page("web/fast", "repeats=5") as page:            # doctest: +SKIP
        ...     page.wait_for_function("window.obdpruneResults")
    """

    def __init__(self, folder: str | Path, query: str = "", *, isolate: bool = True,
                 viewport: tuple[int, int] = (1200, 900)):
        self.folder, self.query, self.isolate, self.viewport = Path(folder), query, isolate, viewport

    def __enter__(self):
        exe = find_chromium()
        sync_playwright = _playwright()
        self._server, url = start_server(self.folder, isolate=self.isolate)
        try:
            self._pw = sync_playwright().start()
            self._browser = self._pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
            page = self._browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
            page.browser_version = self._browser.version
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.goto(url + (f"?{self.query}" if self.query else ""))
            return page
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        for close in (lambda: self._browser.close(), lambda: self._pw.stop()):
            try:
                close()
            except Exception:
                pass
        self._server.shutdown()
        self._server.server_close()


def measure_in_browser(folder: str | Path, *, repeats: int = 20, threads: int | None = None, isolate: bool = True,
                       timeout_s: float = 300.0, screenshot: str | Path | None = None) -> dict[str, Any]:
    """Open an exported page in headless Chromium and return what it published (``window.obdpruneResults``).

    The page runs the dense and the pruned model on its sample images with onnxruntime-web's wasm
    backend and times them (median of ``repeats``) at batch 1 and 64, side by side with an identity
    model (``floor``). ``threads`` asks for that many wasm threads (default: onnxruntime-web's own
    choice; 1 whenever the page is not cross-origin isolated). Adds ``browser``: the Chromium version.

    Example:
        >>> r = measure_in_browser("web/fast", repeats=30, threads=1)   # doctest: +SKIP
        >>> r["pruned"]["ms_b64"] / r["dense"]["ms_b64"]                  # doctest: +SKIP
        0.31
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise UsageError(f"repeats must be a positive integer, got {repeats!r}")
    query = f"repeats={repeats}" + (f"&threads={int(threads)}" if threads else "")
    with open_page(folder, query, isolate=isolate) as page:
        t0 = time.monotonic()
        try:
            page.wait_for_function("window.obdpruneResults || window.obdpruneError", timeout=timeout_s * 1e3,
                                   polling=200)
        except Exception as e:
            raise ObdpruneError(f"the page in {folder} published no results within {timeout_s:.0f} s "
                                f"({'; '.join(page.errors) or type(e).__name__})") from None
        error = page.evaluate("window.obdpruneError || null")
        if error:
            raise ObdpruneError(f"the page in {folder} failed in Chromium: {error}")
        results = page.evaluate("window.obdpruneResults")
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        results["browser"] = f"Chromium {page.browser_version}"
        results["seconds"] = time.monotonic() - t0
    return results
