# Two entry points: `make demo` (train + evaluate the tiny model on easy-vqa) and `make test`.
# Both create .venv with pip and install the pinned, tested set from constraints.txt; `make test` adds the lmms
# extra (lmms-eval and ~80 packages it pulls in), whose adapter test runs lmms-eval's own evaluator. The demo does
# not need it, so it keeps the shorter install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LMMS_STAMP := $(VENV)/.installed-lmms

.PHONY: demo test install lint clean

# setuptools' "Editable installation." notice (a warning inside pip's build backend) is the only one silenced
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

$(LMMS_STAMP): $(STAMP)
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e ".[dev,lmms]"
	touch $(LMMS_STAMP)

install: $(LMMS_STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/zoo demo --resume

test: $(LMMS_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
