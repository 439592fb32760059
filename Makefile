# make train : set up .venv if needed, prepare MovieLens-100k, train Wide & Deep on it
# make test  : run the test suite (CPU)
# make test-fast : the suite without the tests marked slow
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: train test test-fast venv clean

train: $(VENV)/.installed
	$(PY) launch/train.py --config configs/movielens-100k.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps torchrec==1.8.0
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache
