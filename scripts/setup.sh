#!/usr/bin/env bash
# Sets up obdprune in ./.venv (idempotent): Fashion-MNIST from Debian's package where possible,
# the CPU build of torch pinned by constraints.txt, obdprune with its dev extras, and BackPACK; for the
# web page and its tests, Debian's Chromium and npm, and the pinned onnxruntime-web in a local npm cache.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "obdprune needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi; }

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  (as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
    || echo "note: Debian's dataset-fashion-mnist is not available here; 'obdprune data download fashion-mnist' fetches it"
fi

if ! "$PY" -c 'import ensurepip' >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  as_root apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
# constraints.txt pins the CPU torch wheel; an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install -c constraints.txt -e ".[dev]"
# BackPACK declares torchvision (which would pull CUDA torch) but runs without it: no deps.
"${PIP[@]}" install -c constraints.txt --no-deps "backpack-for-pytorch>=1.6"

# The browser runtime: Debian's Chromium (Playwright drives it; never 'playwright install', which downloads a
# browser build of its own) and onnxruntime-web from the npm registry, at the version obdprune.web pins.
if ! { [ -x /usr/bin/chromium ] && command -v npm >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1; then
  need=(); [ -x /usr/bin/chromium ] || need+=(chromium); command -v npm >/dev/null 2>&1 || need+=(npm)
  (as_root apt-get update -qq && as_root apt-get install -y -qq "${need[@]}") >/dev/null 2>&1 \
    || echo "note: could not install ${need[*]} with apt-get; the browser tests will be skipped"
fi
read -r ORT_VERSION ORT_PREFIX < <(.venv/bin/python -c \
  'from obdprune.web import ORT_WEB_VERSION as v, ort_web_prefix as p; print(v, p())')
if [ ! -f "$ORT_PREFIX/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs" ] && command -v npm >/dev/null 2>&1; then
  mkdir -p "$ORT_PREFIX"
  npm install --prefix "$ORT_PREFIX" --ignore-scripts --no-audit --no-fund --loglevel=error \
    "onnxruntime-web@$ORT_VERSION" >/dev/null || echo "note: npm could not install onnxruntime-web@$ORT_VERSION"
fi
echo "obdprune is installed in $(pwd)/.venv"
