# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MIMKIT := $(VENV)/bin/mimkit
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_RUN := runs/demo

.PHONY: demo test data lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's package where apt is usable; otherwise mimkit falls back to
# torchvision's downloader (into ~/.cache/mimkit) the first time the data is read.
data:
	@test -f $(FMNIST) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) \
		|| echo "apt-get not usable: Fashion-MNIST will be downloaded by torchvision on first use"; }

demo: $(VENV)/.installed data
	$(MIMKIT) pretrain mae --config mae_fmnist --epochs 2 --out $(DEMO_RUN)
	$(MIMKIT) visualize $(DEMO_RUN) --out $(DEMO_RUN)/reconstructions.png
	@echo "demo run directory: $(DEMO_RUN)  (picture: $(DEMO_RUN)/reconstructions.png)"

test: $(VENV)/.installed-dev data
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
