# The README's two set-up commands: `make demo` and `make test`. Each creates .venv and installs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
EXTRAS ?= all
PILLOW_SIMD ?= 1

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml setup.py scripts/install-apt.sh scripts/install-pillow-simd.sh datasvc/_jpegcrop.c
	scripts/install-apt.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DATASVC_REQUIRE_EXTENSION=1 $(BIN)/python -m pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	if [ "$(PILLOW_SIMD)" = 1 ]; then scripts/install-pillow-simd.sh $(BIN)/python; fi
	$(BIN)/python -c "import datasvc.decode as d; print('crop-aware decoder:', d.CROP_DECODER)"
	touch $@

install: $(STAMP)

# The main job on the built-in sample: make it, convert it, verify it, benchmark the loaders and
# the storage backends (warm and cold).
demo: install
	$(BIN)/datasvc sample $(OUT)/sample --classes 10 --per-class 48
	$(BIN)/datasvc convert $(OUT)/sample $(OUT)/packs/sample-lmdb --format lmdb --workers 2
	$(BIN)/datasvc verify $(OUT)/packs/sample-lmdb --decode
	$(BIN)/datasvc inspect $(OUT)/packs/sample-lmdb
	$(BIN)/datasvc bench $(OUT)/packs/sample-lmdb --json $(OUT)/bench.json --plot $(OUT)/bench.png
	$(BIN)/datasvc bench --io $(OUT)/packs/sample-lmdb --repeats 1 --read-ahead-methods fadvise \
		--json $(OUT)/bench-io.json --plot $(OUT)/bench-io.png

test: install
	$(BIN)/python -m pytest

# ruff, and the import layers of DESIGN.md (contracts in pyproject.toml's [tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: install
	$(BIN)/datasvc bench --json $(OUT)/bench.json --plot $(OUT)/bench.png

clean:
	rm -rf $(VENV) build *.egg-info datasvc/*.so $(OUT)
