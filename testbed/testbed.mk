# Testbed targets, included by the top-level Makefile (or: make -f testbed/testbed.mk testbed).
#
#   make testbed        build or refresh the cached Xen-in-QEMU testbed (seconds when cached)
#   make testbed-clean  delete the cache
#   make demo           build the testbed, boot it, migrate a cache-heavy guest three ways, print a table
#
# Variables (environment or make command line):
#   SOFTPAGE_TESTBED_CACHE  cache directory (default ~/.cache/softpage/testbed)
#   SOFTPAGE_QEMU_MEM_MB    QEMU memory (default 3072)     SOFTPAGE_DOM0_MEM_MB  dom0 memory (default 1024)
#   SOFTPAGE_DATA_MB        guest data-disk size (default 512)
#   SOFTPAGE_E2E_LOG_DIR    where failed e2e tests keep serial and Xen logs (default results/e2e-logs)

TESTBED_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
# The harness (testbed/softpage_testbed) is installed into the venv by `make setup`.
TESTBED_PYTHON ?= .venv/bin/python

.PHONY: testbed testbed-clean demo

testbed:
	$(TESTBED_DIR)/build.sh all

testbed-clean:
	rm -rf "$${SOFTPAGE_TESTBED_CACHE:-$${XDG_CACHE_HOME:-$$HOME/.cache}/softpage/testbed}"

demo: testbed
	$(TESTBED_PYTHON) $(TESTBED_DIR)/demo.py
