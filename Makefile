# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MIMKIT := $(VENV)/bin/mimkit
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_RUN := runs/demo

.PHONY: demo test data jpeg-headers lint clean

# $(call apt_install_unless,FILE,PACKAGE,WHAT HAPPENS WITHOUT IT): install the Debian package unless FILE
# exists, where apt-get is usable (as root); otherwise say what the package's absence means.
apt_install_unless = test -f $(1) || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	(apt-get install -y -q $(2) || (apt-get update -q && apt-get install -y -q $(2))) || echo "apt-get not usable: $(3)"; }

$(VENV)/.installed: pyproject.toml setup.py src/mimkit/data/_jpeg_region.c | jpeg-headers
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

# libjpeg-turbo's headers, for the optional region decoder (setup.py) where apt is usable; without them the
# install still succeeds and crop decoding decodes whole images (the same pixels, slower).
jpeg-headers:
	@$(call apt_install_unless,/usr/include/jpeglib.h,libjpeg62-turbo-dev,mimkit installs without its region decoder)

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST from Debian's package where apt is usable; otherwise mimkit falls back to
# torchvision's downloader (into ~/.cache/mimkit) the first time the data is read.
data:
	@$(call apt_install_unless,$(FMNIST),dataset-fashion-mnist,Fashion-MNIST will be downloaded by torchvision on first use)

# Pretrain a small MAE, draw its reconstructions, and show what the pretraining is worth: a linear probe on
# 10% of the labels, on the pretrained encoder and on the same encoder randomly initialized.
demo: $(VENV)/.installed data
	$(MIMKIT) pretrain mae --config mae_fmnist --epochs 2 --out $(DEMO_RUN)
	$(MIMKIT) visualize $(DEMO_RUN) --out $(DEMO_RUN)/reconstructions.png
	$(MIMKIT) linprobe $(DEMO_RUN) --data fashion-mnist --label-fraction 0.1 --pool avg --out $(DEMO_RUN)/linprobe
	$(MIMKIT) linprobe $(DEMO_RUN) --data fashion-mnist --label-fraction 0.1 --pool avg --init random \
		--out $(DEMO_RUN)/linprobe-random
	@$(PY) -c "import json; r = lambda d: json.load(open('$(DEMO_RUN)/' + d + '/results.json'))['test_top1']; \
		print(f'linear probe, 10% of the labels: pretrained {r(\"linprobe\"):.1f}% vs random init {r(\"linprobe-random\"):.1f}%')"
	@echo "demo run directory: $(DEMO_RUN)  (picture: $(DEMO_RUN)/reconstructions.png)"

# Idle OpenMP threads sleep instead of spinning (spinning slows every other process on a small machine).
test: $(VENV)/.installed-dev data
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs
