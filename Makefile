PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?=

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install --quiet -e '.[service,engine,test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -p no:cacheprovider

demo: install
	$(PY) scripts/demo.py $(if $(DATA),--data $(DATA))

bench: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf demo-output bench-output .pytest_cache
