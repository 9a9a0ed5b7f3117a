# Setup is a stamp file: `make run` / `make test` install once, and again only when
# pyproject.toml changes. torch==2.13.0 goes in first so that nothing pulls a CUDA build.
PY := .venv/bin/python
STAMP := .venv/.qdtk-installed
COMPAT := .venv-tf4/.qdtk-installed
# What must also pass on transformers 4.x: the native dLLMs, generation, capture and run on them,
# and packed folders (from_pretrained through the quantizer, and its gate without qdtk).
COMPAT_TESTS := tests/test_models.py tests/test_generate.py tests/test_capture.py \
	tests/test_pipeline.py tests/test_nn.py

.PHONY: run test lint bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

$(COMPAT): pyproject.toml scripts/setup-compat.sh
	bash scripts/setup-compat.sh
	touch $(COMPAT)

run: $(STAMP)
	HF_HUB_OFFLINE=1 .venv/bin/qdtk run

test: $(STAMP) $(COMPAT)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2
	HF_HUB_OFFLINE=1 .venv-tf4/bin/python -m pytest -q -n 2 -p no:cacheprovider $(COMPAT_TESTS)

lint: $(STAMP)
	.venv/bin/ruff check qdtk cli tests bench
