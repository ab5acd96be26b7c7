# The two commands of the README: `make demo` and `make test`.
# Both install what they need: Debian packages, a virtual environment, and editable
# installs of the core and every plugin under plugins/.

VENV    ?= .venv
# Debian's own python3 when there is one: built with PGO and LTO, the `snapcore`
# command starts ~5 ms (10%) faster on it than on an unoptimised build (pyenv's)
PYTHON  ?= $(firstword $(wildcard /usr/bin/python3) python3)
PY      := $(VENV)/bin/python
PLUGINS := $(sort $(wildcard plugins/*/pyproject.toml))
STAMP   := $(VENV)/.installed
# make install-admin: where the command, the systemd units, shell completion and the
# man page go (DESTDIR for a staging root)
PREFIX  ?= /usr/local
UNITDIR ?= $(PREFIX)/lib/systemd/system

.PHONY: demo test setup apt criu venv lint bench clean install-admin

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -p snapcore.testing $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/freeze.py

setup: apt criu $(STAMP)

apt:
	@scripts/setup-apt.sh

criu: apt
	@scripts/setup-criu.sh

$(STAMP): pyproject.toml $(PLUGINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# each pyproject sets package-dir = {"" = "."}: setuptools then installs an
	# editable project as a plain path in a .pth file, not an import hook (~7 ms at
	# every interpreter start; the CLI aims at <= 50 ms)
	$(PY) -m pip install -q -e '.[dev]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $(STAMP)

# the `snapcore` command (this checkout's, linked), the systemd units (scheduled
# checkpoints and pruning, the cluster agent), bash and zsh completion, snapcore(8)
install-admin: setup
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR)
	ln -sfn $(abspath $(VENV))/bin/snapcore $(DESTDIR)$(PREFIX)/bin/snapcore
	for unit in systemd/*.service systemd/*.timer; do \
	  sed 's|/usr/local/bin/snapcore|$(PREFIX)/bin/snapcore|' $$unit > $(DESTDIR)$(UNITDIR)/$$(basename $$unit); \
	done
	$(PY) scripts/admin-files.py $(DESTDIR)$(PREFIX)

clean:
	rm -rf $(VENV) build *.egg-info plugins/*/*.egg-info
