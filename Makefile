# Two commands: `make book` builds the rendered book into _build/html; `make test` runs every test.
# Each sets up its own virtual environment (.venv) on first use. The browser test needs Chromium or
# Google Chrome and a matching chromedriver: GitHub's hosted runners ship Chrome with one (in
# $CHROMEWEBDRIVER); elsewhere `make test` installs Debian's chromium and chromium-driver if no
# chromedriver is found. (Ubuntu's chromium package is a snap stub: install Google Chrome and its
# chromedriver there instead.)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MUJOCO_GL ?= egl

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: book test setup browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

book: $(VENV)/.installed
	$(BIN)/jupyter-book build . -W --keep-going --all

browser:
	@if command -v chromedriver >/dev/null || [ -x "$$CHROMEWEBDRIVER/chromedriver" ]; then :; else \
		echo "installing chromium and chromium-driver for the browser test"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver; fi

test: $(VENV)/.installed browser
	$(BIN)/python -m pytest tests -p no:cacheprovider

clean:
	rm -rf _build
