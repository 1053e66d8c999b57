# sdqkd — every task a developer or CI runs. `make test` works on a fresh machine:
# it installs the Debian packages, creates .venv and installs the pinned Python set.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SDQKD := $(VENV)/bin/sdqkd
STAMP := $(VENV)/.sdqkd-installed
# Every Debian package the code and the tests use at run time, named directly (not through a
# transitional or a depending package); tests/test_debian_packages.py fails when one is missing.
# libyang2 is the YANG engine at run time (PyPI libyang, a CFFI extension built with gcc against libyang2-dev);
# yanglint (libyang2-tools) validates instance data in tests; yangcli and ssh-keygen are real clients for the agent tests.
# sslpsk3 (QKD-keyed TLS) is a C extension built with gcc against libssl-dev and run against libssl3; the openssl CLI
# is the third-party TLS 1.3 peer in its tests.
# QKD-keyed IPsec: strongSwan charon, the plugins it loads (crypto: libstrongswan; socket, vici: libcharon), curve25519 (extra plugins),
# kernel-libipsec (charon extra plugins), swanctl; iproute2 and ping. apache2-utils: ab in bench/etsi014.py. curl: the
# README's examples (and its test). procps: pgrep in the lab's kill -9 test.
DEBS := libyang2 libyang2-dev libyang2-tools yangcli openssh-client gcc libssl-dev libssl3 openssl \
	strongswan-charon strongswan-libcharon libstrongswan libstrongswan-extra-plugins libcharon-extra-plugins strongswan-swanctl \
	iproute2 iputils-ping apache2-utils curl procps
# What only the benchmarks need on top (bench/netconf_vs_netconfd.py: yuma123 netconfd behind OpenSSH's sshd;
# bench/validate.py: git, to take the pre-libyang code as its same-run baseline).
BENCH_DEBS := netconfd openssh-server git
PYTEST_ARGS ?=

.PHONY: all debs bench-debs print-debs venv bindings lint-yang test demo clean

all: test

debs:
	@tools/install-debs $(DEBS)

bench-debs: debs
	@tools/install-debs $(BENCH_DEBS)

# The package lists, for the test that guards them: `make -s print-debs`.
print-debs:
	@echo "DEBS $(DEBS)"
	@echo "BENCH_DEBS $(BENCH_DEBS)"

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: debs $(STAMP)

# Regenerate bindings/ from yang/ (never edit bindings/ by hand).
bindings: venv
	$(SDQKD) yang bindings

lint-yang: venv
	$(SDQKD) yang lint

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# Bring up the MadQCI lab, fetch a key relayed across both domains, show the network.
# The lab stays up for you to explore: `.venv/bin/sdqkd lab down` stops it.
demo: venv
	@$(SDQKD) lab down madqci >/dev/null 2>&1 || true  # a lab left from an earlier demo
	$(SDQKD) lab up lab/topologies/madqci.json
	$(SDQKD) key get --from Quintin --to Distrito
	$(SDQKD) lab status madqci

clean:
	rm -rf $(VENV) .pytest_cache .sdqkd
	find . -name __pycache__ -prune -exec rm -rf {} +
