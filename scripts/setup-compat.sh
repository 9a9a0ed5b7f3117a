#!/usr/bin/env bash
# .venv-tf4: qdtk beside transformers 4.57, the 4.x line LLaDA's and Dream's own code was written
# for, to test that the native models and the model-code choice work there too.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-tf4/bin/python ] || python3 -m venv .venv-tf4
pip=".venv-tf4/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0  # first: nothing later may pull a CUDA torch
$pip install -q "transformers==4.57.*"
$pip install -q -e ".[capture,dev]"
