# oe-router: python-oe, opportunistic IPsec for a router's LAN.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST := $(PY) -m pytest
RESULTS := test-results
LINT_DIRS := $(wildcard src tests qemu bench fuzz package)

.PHONY: setup test test-unit test-fuzz test-host test-qemu lint demo demo-host image bench fuzz package clean

setup:
	@bash scripts/setup.sh

# pytest exit 5 means "no test collected": a tier that has none yet says so and passes.
define run_tier
	@mkdir -p $(RESULTS)
	@echo "== tier $(1) =="
	@$(PYTEST) tests/$(1) --junitxml=$(RESULTS)/$(1).xml -o junit_suite_name=$(1) $(2); rc=$$?; \
	  if [ $$rc = 5 ]; then echo "tier $(1): no tests exist yet"; exit 0; fi; exit $$rc
endef

test: test-unit test-fuzz test-host test-qemu

test-unit: setup
	$(call run_tier,unit,-q --timeout=300)

# Fuzz smoke (CI): every fuzz target over its seed corpus, then FUZZ_SMOKE_TIME seconds each.
test-fuzz: setup
	$(call run_tier,fuzz,-q -s --timeout=600)

test-host: setup
	$(call run_tier,host,-q --timeout=600)

test-qemu: setup image
	$(call run_tier,qemu,-q --timeout=1200)

lint: setup
	$(PY) -m ruff check $(LINT_DIRS)
	$(PY) -m ruff format --check $(LINT_DIRS)
	$(PY) -m mypy

image: setup
	@if [ -f qemu/build.py ]; then $(PY) qemu/build.py; else echo "image: the QEMU lab does not exist yet"; fi

demo: setup image
	$(PY) qemu/demo.py

# The daemon alone on this host (no lab): config check, start, oe status, stop.
demo-host: setup
	@bash scripts/demo.sh

bench: setup
	@mkdir -p bench/results
	$(PY) -m bench.run $(BENCH)

# Coverage-guided fuzzing (atheris): FUZZ_TIME seconds per target, FUZZ_TARGETS to pick
# (comma-separated; default all). Results: fuzz/results/<target>.json; see docs/fuzzing.md.
FUZZ_TIME ?= 600
FUZZ_TARGETS ?=
fuzz: setup
	$(PY) -m fuzz.run --time $(FUZZ_TIME) $(if $(FUZZ_TARGETS),--targets $(FUZZ_TARGETS))

# The .ipks opkg installs (dist/python3-oe_<version>_all.ipk, dist/luci-app-oe_<version>_all.ipk)
# and the sdist python3-oe is built from, out of package/python-oe/Makefile and
# package/luci-app-oe/Makefile without the OpenWrt SDK: package/ipk.py, docs/package.md.
package: setup
	$(PY) package/ipk.py --out dist

clean:
	rm -rf $(RESULTS) build dist src/*.egg-info
