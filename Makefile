# sdqkd — every task a developer or CI runs. `make test` works on a fresh machine:
# it installs the Debian packages, creates .venv and installs the pinned Python set.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SDQKD := $(VENV)/bin/sdqkd
STAMP := $(VENV)/.sdqkd-installed
# yanglint (libyang) validates instance data in tests; yangcli and ssh-keygen are real clients for the agent tests.
# sslpsk3 (QKD-keyed TLS) is a C extension built with gcc against libssl-dev; the openssl CLI is the third-party TLS 1.3 peer in its tests.
# strongSwan (charon, swanctl, kernel-libipsec in libcharon-extra-plugins), iproute2 and ping: QKD-keyed IPsec.
DEBS := libyang-tools yangcli openssh-client gcc libssl-dev openssl strongswan-charon strongswan-swanctl libcharon-extra-plugins iproute2 iputils-ping apache2-utils
PYTEST_ARGS ?=

.PHONY: all debs venv bindings lint-yang test demo clean

all: test

debs:
	@tools/install-debs $(DEBS)

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
