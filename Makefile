# husk: build, test and benchmark entry points.
# `make demo` and `make test` work on a fresh Debian bookworm machine (as root):
# they install what they need first.

SHELL := /bin/bash
BUILD := build
VENV := .venv
PY := $(VENV)/bin/python
GUEST := $(BUILD)/guest

# What building the guest kernel from Debian's source takes (guest-image/build.sh);
# defined first: := expands it where HOST_PACKAGES is defined.
KERNEL_BUILD_PACKAGES := gcc make bc bison flex libelf-dev libssl-dev openssl patch xz-utils
# Host packages, all from Debian bookworm.
HOST_PACKAGES := qemu-system-x86 qemu-utils containerd runc crun mmdebstrap \
	busybox-static squashfs-tools cpio zstd containernetworking-plugins \
	iproute2 kmod e2fsprogs iptables ceph-mon ceph-osd ceph-common qemu-block-extra \
	$(KERNEL_BUILD_PACKAGES)

.PHONY: all deps venv proto guest-image test test-unit test-vm test-cold test-cri demo soak critest \
	bench-boot bench-cri bench-density bench-monitor bench-net bench-io bench-resize clean

all: venv guest-image

# $(call apt_install,packages): installs from Debian those not installed yet, so a
# prepared machine pays nothing.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
		| grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing host packages: $$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends $$missing; \
	fi
endef

deps: $(BUILD)/.host-deps
$(BUILD)/.host-deps: Makefile
	$(call apt_install,$(HOST_PACKAGES))
	@mkdir -p $(BUILD) && touch $@

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.lock -r requirements-dev.lock
	$(VENV)/bin/pip install -q --no-deps -e . --config-settings editable_mode=compat
	@touch $@

# Regenerates proto/gen/ from the .proto files (the generated code is committed).
proto: venv
	$(PY) -m proto.generate

guest-image: deps venv
	guest-image/build.sh $(GUEST)

# Unit tests first (seconds); then VM and CRI tests, two workers, one file per worker;
# then the tests that load the whole machine (ten VMs at once), alone.
test: deps venv guest-image
	$(PY) -m pytest -q -rs -p no:cacheprovider tests/unit
	$(PY) -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile -m "not whole_machine" tests/integration
	$(PY) -m pytest -q -rs -p no:cacheprovider -m whole_machine tests/integration

test-unit: venv
	$(PY) -m pytest -q -rs -p no:cacheprovider tests/unit

test-vm: deps venv guest-image
	$(PY) -m pytest -q -p no:cacheprovider -m vm tests/integration

# The VM and CRI tests with every guest booted cold (VM templates off); as in `test`,
# the tests that load the whole machine (ten VMs at once) run alone.
test-cold: deps venv guest-image
	HUSK_TEST_TEMPLATES=off $(PY) -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile \
		-m "not whole_machine" tests/integration
	HUSK_TEST_TEMPLATES=off $(PY) -m pytest -q -rs -p no:cacheprovider -m whole_machine tests/integration

test-cri: deps venv guest-image
	$(PY) -m pytest -q -p no:cacheprovider -m cri tests/integration

# A private containerd with the husk handler, one busybox pod in its VM, then cleanup.
demo: deps venv guest-image
	$(PY) -m tests.cri.demo

# Pods and containers started and removed 100 times in a row (too slow for every CI run).
soak: deps venv guest-image
	HUSK_LIFECYCLES=100 $(PY) -m pytest -q -p no:cacheprovider tests/integration/test_faults.py \
		-k "lifecycles"

# cri-tools' validation suite (critest) against the handlers runc and husk of a private
# containerd (~25 min under TCG); reports in build/critest/. CRITEST_FOCUS='regex' runs a
# few specs; CRITEST_DIR is where critest is (default ../shared/tools/cri-tools).
# gcc and libc6-dev build critest's nginx and nonewprivs stand-in images.
critest: deps venv guest-image
	$(call apt_install,gcc libc6-dev)
	$(PY) -m tests.cri.critest

bench-boot: deps venv guest-image
	$(PY) -m tests.bench.boot

# Pod steps one at a time (BENCH_RUNS, default 5) and 10 pods at once (BENCH_PARALLEL_RUNS,
# default 3): runc, husk from a VM template and husk booting cold (~10 min under TCG);
# the JSON also goes to build/bench/cri.json.
bench-cri: deps venv guest-image
	$(PY) -m tests.bench.cri

# PSS of BENCH_PODS idle pods (default 10) per pod and per component (shim, QEMU guest
# RAM, TCG buffer, rest of QEMU, virtiofsd), husk against runc, BENCH_RUNS rounds
# (default 3); the JSON also goes to build/bench/density.json.
bench-density: deps venv guest-image
	$(PY) -m tests.bench.density

# What husk monitor's scrapes cost BENCH_PODS idle pods (default 10): scrape time, the pods'
# extra CPU per scrape, the monitor's own (~3 min); JSON also in build/bench/monitor.json.
bench-monitor: deps venv guest-image
	$(PY) -m tests.bench.monitor

# TCP throughput and latency, pod<->pod and node->pod, husk against runc (~75 s under TCG);
# BENCH_RUNS=n rounds (default 5); the JSON also goes to build/bench/net.json.
bench-net: deps venv guest-image
	$(PY) -m tests.bench.net

# fio in a container: 1 MiB sequential and 4 KiB random reads and writes, direct I/O, on
# a runc pod's host path (the ceiling) and a husk pod's virtio-fs, block and rbd volumes
# (~6 min under TCG, ~3 more when a pod's I/O hangs and is retried); BENCH_RUNS=n rounds
# (default 3); the JSON also goes to build/bench/io.json. The fio image is made of the
# host's fio and the libraries it loads.
bench-io: deps venv guest-image
	$(call apt_install,fio)
	$(PY) -m tests.bench.io

# In-place resize: UpdateContainerResources until the guest has the new vCPUs and
# memory online, husk against runc (medians of 5).
bench-resize: deps venv guest-image
	$(PY) -m tests.bench.resize

clean:
	rm -rf $(BUILD) $(VENV)
