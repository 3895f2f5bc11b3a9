# Two entry points: `make demo` (train + evaluate the tiny model on easy-vqa) and `make test`.
# Both create .venv with pip and install the pinned, tested set from constraints.txt. The demo needs the package
# alone; `make test` adds the extras its tests drive: dev (pytest, ruff, the serving page and its clients), lmms
# (lmms-eval and ~80 packages it pulls in, for the adapter test that runs lmms-eval's own evaluator) and deepspeed
# (the DeepSpeed tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test install lint clean

# setuptools' "Editable installation." notice (a warning inside pip's build backend) is the only one silenced
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt \
		-e ".[dev,lmms,deepspeed]"
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/zoo demo --resume

test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
