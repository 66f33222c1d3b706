# One entry point for people and CI. Everything lands in .venv; weights in $CATNET_HOME (default ~/.cache/catnet).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.catnet-installed
# Where pip gets torch. Empty: the index pip is configured with (on this project's machines, the CPU wheel).
# A CPU-only machine elsewhere: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu`, PyTorch's
# own CPU wheels, instead of the multi-GB CUDA build that PyPI's torch==2.13.0 is on Linux.
TORCH_INDEX ?=

.PHONY: setup weights browser demo test lint clean

setup: $(STAMP) weights

# torch is installed on its own, pinned: an unpinned or ranged torch pulls a multi-GB CUDA build here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	# PyTorchVideo is only the reference the tests compare i3d_r50 against; its deps are not needed.
	$(BIN)/python -m pip install -q --no-deps pytorchvideo==0.1.5
	# aeon ships the real BasicMotions / PickupGestureWiimoteZ sequences; only its data files are read.
	$(BIN)/python -m pip install -q --no-deps aeon==1.6.0
	touch $(STAMP)

# Idempotent: a second run finds the converted weights and does nothing.
weights: $(STAMP)
	$(BIN)/catnet weights fetch

# Headless Chromium + driver for the web page's end-to-end test (Debian packages; needs root, as in CI).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: chromium not installed; the browser test will be skipped"; fi

demo: setup
	$(BIN)/catnet demo

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
