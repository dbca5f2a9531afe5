# The two commands of a fresh machine: `make demo` (set up, train and evaluate on the bundled digits) and
# `make test` (set up, run the test suite). Both create the virtual environment .venv when it is missing.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off -e ".[dev]"
	touch $@

# Training writes checkpoints/digits/version_<n>/ and links checkpoints/digits/last.ckpt to that run's last
# checkpoint, so the evaluation below always gets the model just trained (tests/test_train.py checks it).
demo: setup
	$(BIN)/python train.py fit --config configs/digits.yaml
	$(BIN)/python evaluate.py --config configs/eval_digits.yaml --ckpt_path checkpoints/digits/last.ckpt

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: PYTEST_ARGS :=
test-all: test

clean:
	rm -rf $(VENV) logs checkpoints/*/ .pytest_cache
