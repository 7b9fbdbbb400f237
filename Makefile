# Two commands on a fresh machine: `make run` and `make test` (README.md).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PIP   := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: install run test test-fast bench clean

# Reinstall when the pins or the project metadata change. torch 2.14.1 + torchvision 0.29.1 come
# from this machine's local wheel folders (pip is configured for them); the rest from PyPI.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -r requirements.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	@$(PY) -c "import torch, torchvision, prefect, polars, open_clip" || (echo "install failed: see the pip output above"; exit 1)
	$(PIP) --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/aot run

test: $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 3 --dist loadfile -m "not slow"

bench: $(STAMP)
	$(PY) experiments/bootstrap.py

clean:
	rm -rf aot-data .pytest_cache
