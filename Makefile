# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the pinned CPU wheel first, so the package's torch range installs nothing more.
TORCH_PIN ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: venv install test test-fast test-heavy test-slow demo demo-full lint clean

# uv installs the rest in parallel (44-63 s here, against about 100 s with pip) and keeps the torch
# installed first; plain pip if uv cannot be had.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
ifneq ($(HAS_GPU),1)
	$(PIP) install -q $(TORCH_PIN)
endif
	( $(PIP) install -q uv && $(PY) -m uv pip install -q --python $(PY) -e ".[dev,data]" ) || $(PIP) install -q -e ".[dev,data]"
	touch $@

venv install: $(VENV)/.installed

# Everything, in two steps: the default tests, then the heavy subprocess tests (README recipe, SIGKILL resume,
# torchrun; marker `heavy`). Each step collects tests, so pytest's exit 5 (nothing collected) fails the make.
test: $(VENV)/.installed
	$(MAKE) --no-print-directory test-fast
	$(MAKE) --no-print-directory test-heavy

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not heavy" tests

test-heavy: $(VENV)/.installed
	$(PY) -m pytest -q -m heavy tests

test-slow: $(VENV)/.installed
	RUN_SLOW=1 $(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

# surface temperature (GloSea4 test month), then the five-variable model on the TIGGE test box (precipitation members):
# `make demo` is the quick look (3 fields, 4 members, 4 steps; under a minute on 2 idle cores), `make demo-full` the
# whole test month with 10 members and 10 steps (the README's tables)
demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/dpdm demo --quick
	HF_HUB_OFFLINE=1 $(VENV)/bin/dpdm demo --quick --model models/dpdm-tigge-5var-x4 --out-dir outputs/five-variables

demo-full: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(VENV)/bin/dpdm demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/dpdm demo --model models/dpdm-tigge-5var-x4 --out-dir outputs/five-variables

clean:
	rm -rf $(VENV) outputs .pytest_cache build *.egg-info
