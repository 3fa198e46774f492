# Two commands set up everything on a fresh machine (see README):
#   make demo   install into .venv if needed, then run `lensforge demo`
#   make test   install into .venv if needed, then run the test suite (CI runs exactly this)

VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip install --quiet --disable-pip-version-check

# torch/torchvision are installed first, pinned to a pair that imports together: a plain
# `pip install torch` lets the resolver pick a torchvision built for another torch.
# Override for your platform, e.g. `make demo TORCH="torch torchvision"`.
ifeq ($(shell uname -m),aarch64)
TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TORCH ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test install bench clean browser

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[train,dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lensforge demo

# headless Chromium + chromedriver for tests/test_web.py (Debian packages); skipped where apt-get
# is missing or fails (not root, offline): the browser test then skips, saying why
browser:
	@test -x /usr/bin/chromedriver || ! command -v apt-get >/dev/null || \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver || \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
		echo "warning: could not install chromium (tests/test_web.py will skip)"

test: $(VENV)/.installed browser
	$(PY) -m pytest

bench: $(VENV)/.installed
	for b in bench/[!_]*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) lensforge-demo runs .pytest_cache
