#!/usr/bin/env bash
# Runs lint and the whole test suite on the CPU, installing the project first when needed.
source "$(dirname "$0")/ensure_venv.sh"
ruff check .
python -m pytest -q "$@"
