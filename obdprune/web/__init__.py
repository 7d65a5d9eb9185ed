"""The browser as a runtime: export a pruned run and its dense parent as a static page, serve it, and
measure it in headless Chromium.

    export_web(run, out)          the page: both models as checked ONNX, sample images, onnxruntime-web (wasm)
    serve(folder, port)           a 127.0.0.1 static server with the headers that allow wasm threads
    measure_in_browser(folder)    open the page in headless Chromium and read what it measured
    browser_study(summary, out)   the same for every result of a study (``compare --browser``)
"""
from obdprune.web.browser import CHROMIUM_ARGS, find_chromium, measure_in_browser, open_page
from obdprune.web.export import (ORT_WEB_FILES, ORT_WEB_VERSION, export_web, find_dense_parent, ort_web_dist,
                                 ort_web_prefix, read_samples, read_web_manifest)
from obdprune.web.server import ISOLATION_HEADERS, make_server, serve, start_server, url_of

__all__ = ["export_web", "serve", "measure_in_browser", "find_dense_parent", "read_web_manifest", "read_samples",
           "open_page", "find_chromium", "make_server", "start_server", "url_of", "ort_web_prefix", "ort_web_dist",
           "ORT_WEB_VERSION", "ORT_WEB_FILES", "ISOLATION_HEADERS", "CHROMIUM_ARGS"]
