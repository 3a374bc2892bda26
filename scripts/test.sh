#!/usr/bin/env bash
# Installs reconciler with its development tools into .venv and runs every check:
# the tests (SQLite always; PostgreSQL when RECONCILER_TEST_POSTGRES_URL is set), ruff,
# mypy and the import-layer contracts.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/pytest ] || ! .venv/bin/python -c 'import reconciler, desired_state' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
# The distribution was called "reconciler" before it became gitops-reconciler: drop that one.
if .venv/bin/pip show --quiet reconciler >/dev/null 2>&1; then .venv/bin/pip uninstall --quiet -y reconciler; fi
.venv/bin/pip install --quiet -e '.[dev]'
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy desired_state reconciler
.venv/bin/lint-imports
.venv/bin/pytest -q "$@"
