#!/usr/bin/env bash
# The test command: install into $VENV (default .venv), check style and types, run every test.
# Browser tests need Debian's chromium; as root this script installs it when it is missing.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k ray
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
bash scripts/install.sh test,dev
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed"
fi
export PATH="$VENV/bin:$PATH"
ruff format --check .
ruff check .
mypy
# Frontend unit tests (jest); the editable install above already ran `jlpm install` there.
(cd labextension && jlpm install --silent >/dev/null && jlpm test --silent)
# -m "" lifts the default marker filter: embedded-model and browser tests run here too.
python -m pytest -m "" "$@"
