# Two entry points: `make demo` (train + evaluate the tiny model on easy-vqa) and `make test`.
# Both create .venv with pip and install the pinned, tested set from constraints.txt (with the deepspeed extra,
# which the DeepSpeed tests run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

# setuptools' "Editable installation." notice (a warning inside pip's build backend) is the only one silenced
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install --quiet -c constraints.txt -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/zoo demo --resume

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs
