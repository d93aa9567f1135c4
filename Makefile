# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create the Python 3.12 virtualenv on first use (deeplens-core needs 3.12).

VENV  ?= .venv
PY    := $(VENV)/bin/python
PSF   := $(VENV)/bin/psf
STAMP := $(VENV)/.installed
DEMO  := runs/demo

.PHONY: venv demo test test-fast lint format bench clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then \
		py=$$(tools/find-python312) || exit 1; \
		echo "creating $(VENV) with $$py"; \
		rm -rf $(VENV) && $$py -m venv $(VENV) || exit 1; \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

demo: $(STAMP)
	$(PSF) generate --config configs/demo.yaml --out $(DEMO)/grid.h5
	$(PSF) info $(DEMO)/grid.h5
	$(PSF) train --data $(DEMO)/grid.h5 --config configs/demo_train.yaml --run-dir $(DEMO)/cvae \
		$$(test -f $(DEMO)/cvae/latest.pt && echo --resume)
	$(PSF) eval --checkpoint $(DEMO)/cvae/latest.pt --data $(DEMO)/grid.h5 --out $(DEMO)/eval

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)  # the edit-test loop: without the subprocess and multi-process tests
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_accuracy.py
	$(PY) benchmarks/bench_inference.py --checkpoint runs/bench_accuracy/acl12708u/run_default/best.pt

clean-demo:
	rm -rf $(DEMO)
