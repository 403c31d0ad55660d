# `make test` and `make demo` build .venv from requirements.txt when it is missing or stale, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: test lint demo app install clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

# ruff, with the rules pyproject.toml chooses
lint: $(STAMP)
	$(PY) -m ruff check .

# The whole pipeline on the synthetic shapes dataset; `make demo DATA=path` runs the recipe on another dataset
# in COCO format (images/, captions_train.json, captions_test.json).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) demo.py $(if $(DATA),--data $(DATA))

# The web page over the export `make demo` wrote (or CHECKPOINT=dir or user/name), on http://127.0.0.1:7860
app: $(STAMP)
	$(PY) app.py $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

clean:
	rm -rf $(VENV) .pytest_cache
