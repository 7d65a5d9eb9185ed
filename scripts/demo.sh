#!/usr/bin/env bash
# Set everything up, then run the few-minute demo study on Fashion-MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c 'from obdprune.data import find_data_dir; find_data_dir("fashion-mnist")' >/dev/null 2>&1; then
  .venv/bin/obdprune data download fashion-mnist
fi
exec .venv/bin/obdprune demo "$@"
