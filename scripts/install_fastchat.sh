#!/usr/bin/env bash
# FastChat 0.2.36 in its own virtual environment, for the mixed-fleet tests (tests/e2e/test_fastchat_mix.py): they
# run FastChat's controller, model worker and API server beside lmfleet's parts. `make test` runs this script.
#
#   bash scripts/install_fastchat.sh [PYTHON] [VENV]      (defaults: python3 .venv-fastchat)
#
# FastChat's own requirements need three pins to start at all: transformers 4.x (5.x fails with KeyError 'factor'),
# pydantic 1 (pydantic 2 breaks its streaming) and the FastAPI release that still takes pydantic 1. They go in a
# second step (pip then reports that typer and kernels, which FastChat does not run, wanted newer ones). torch
# comes from the machine's local wheels (pip's find-links) like the main environment's. A marker file says it is
# done; `make clean` removes the environment.
set -euo pipefail
PYTHON=${1:-python3}
VENV=${2:-.venv-fastchat}
MARKER="$VENV/.installed"
[ -f "$MARKER" ] && exit 0
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 "fschat[model_worker]==0.2.36"
"$VENV/bin/pip" install -q transformers==4.57.6 pydantic==1.10.14 fastapi==0.110.0
"$VENV/bin/python" -c "import fastchat, transformers, pydantic; assert fastchat.__version__ == '0.2.36', fastchat.__version__"
touch "$MARKER"
