#!/usr/bin/env bash
# The test suite: offline, on the CPU, tiny models and the generated toy world.
# Two pytest-xdist workers by default (each test runs torch on one thread, so one worker per
# core of a 2-core machine); a test file stays on one worker, its module fixtures built once.
# SAFERCLIP_TEST_WORKERS=0 runs everything in this process (e.g. for --pdb or a shared machine).
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# PYTHON: the interpreter to test with (default: the one on PATH); CI passes its fresh venv's
# interpreter without activating the venv, so no test may rely on an activated PATH.
python="${PYTHON:-python}"
workers="${SAFERCLIP_TEST_WORKERS:-2}"
if [ "$workers" = 0 ]; then
    "$python" -m pytest -q "$@"
else
    "$python" -m pytest -q -n "$workers" --dist loadfile "$@"
fi
