# blksnap — every target is safe to re-run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Debian packages: file systems to test on, fio, NBD clients (qemu-img,
# qemu-nbd, qemu-io; nbdinfo, nbdcopy) for the NBD tests and benchmark; gcc
# for the compiled short way.
# blksnapd mounts its FUSE files itself (mount(2) on /dev/fuse): no libfuse.
APT_PACKAGES := e2fsprogs xfsprogs util-linux fio qemu-utils libnbd-bin gcc
# A throwaway Ceph cluster with a RADOS Gateway: the real S3 endpoint of the
# S3 repository tests (blksnap/tools/rgw.py); without recommends: ~57 MiB.
APT_NORECS := ceph-mon ceph-osd radosgw ceph-common
# make bench only: libfuse3 to build pyfuse3 for the do-nothing reference fs;
# gcc for it and for bench/cserver.c (the request loop compiled, a measure).
APT_BENCH := fuse3 libfuse3-dev pkg-config gcc
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup apt demo test bench lint clean

# The compiled short way of the FUSE data path (blksnap/shortway.py): plain
# C, no Python headers; without it blksnapd serves everything in Python.
SHORTWAY := blksnap/_shortway.so
CFLAGS_SHORTWAY := -O2 -g -Wall -Wextra -std=gnu11 -shared -fPIC

setup: $(STAMP) $(SHORTWAY)

$(SHORTWAY): blksnap/_shortway.c
	$${CC:-gcc} $(CFLAGS_SHORTWAY) -o $@.tmp $< && mv $@.tmp $@

apt:
	@missing=""; for p in $(APT_PACKAGES) $(EXTRA_APT); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@missing=""; for p in $(APT_NORECS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (no recommends):$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$missing || \
	    echo "could not install$$missing: the S3 tests will be skipped"; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/blksnap demo

test: setup
	$(PY) -m pytest -q

$(BENCH_STAMP): $(STAMP)
	$(MAKE) apt EXTRA_APT="$(APT_BENCH)"
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(SHORTWAY)
	$(PY) bench/run.py --output BENCHMARKS.md

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache $(SHORTWAY)
