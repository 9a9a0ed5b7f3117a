# Setup is a stamp file: `make run` / `make test` install once, and again only when
# pyproject.toml changes. torch==2.13.0 goes in first so that nothing pulls a CUDA build.
PY := .venv/bin/python
STAMP := .venv/.qdtk-installed

.PHONY: run test lint bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

run: $(STAMP)
	HF_HUB_OFFLINE=1 .venv/bin/qdtk run

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2

lint: $(STAMP)
	.venv/bin/ruff check qdtk cli tests bench
