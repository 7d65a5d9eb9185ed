#!/usr/bin/env bash
# Set everything up, then run the test suite (under 10 minutes on 2 cores): one pytest worker per core
# (each test runs torch on one thread), test files kept whole on one worker.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${OBDPRUNE_TEST_WORKERS:-2}" --dist loadfile "$@"
