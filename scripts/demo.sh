#!/usr/bin/env bash
# The main job: install into $VENV (default .venv), then execute notebooks/quickstart.ipynb end to
# end in a real kernel on the embedded defaults (local Ray, the bundled offline model).
# The executed notebook is written to notebooks/quickstart.out.ipynb.
set -euo pipefail
VENV="${VENV:-$(dirname "$0")/../.venv}"
VENV="$(realpath -m "$VENV")"
export VENV
cd "$(dirname "$0")/.."
bash scripts/install.sh test
"$VENV/bin/python" -m apwa_jupyter.demo notebooks/quickstart.ipynb notebooks/quickstart.out.ipynb
