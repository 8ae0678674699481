# Everything a fresh machine needs: `make test` and `make demo` create .venv and install into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
FACEMETRIC_DATA ?= $(abspath ../shared/data)
export FACEMETRIC_DATA

.PHONY: venv postgres compiler test lint demo bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch that lies on this machine; installed first and alone so that
	# nothing later pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# PostgreSQL server binaries for the PostgresGallery tests, which start a throwaway server of
# their own (never a system service); installed from the distribution when missing and root.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	else \
		echo "PostgreSQL server binaries (initdb) are missing: apt-get install postgresql as root." \
			"Without them the PostgreSQL gallery tests skip (fail under FACEMETRIC_REQUIRE_DATA=1)" >&2; \
	fi

# A C++ compiler for torch.compile's CPU kernels ([train] compile, tests/training/test_compile.py).
compiler:
	@if command -v g++ >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y g++; \
	else \
		echo "g++ is missing: apt-get install g++ as root; [train] compile needs it on CPU" >&2; \
	fi

test: $(STAMP) postgres compiler
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

demo: $(STAMP)
	$(PY) -m facemetric demo --data "$(FACEMETRIC_DATA)"

bench: $(STAMP)
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
