#!/usr/bin/env bash
# The whole test suite (CPU). Extra arguments go to pytest, e.g. scripts/test.sh -k resume
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m pytest -q tests "$@"
