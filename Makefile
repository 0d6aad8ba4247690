# The two commands of the README: `make run` and `make test`. Everything else is their plumbing.
# A fresh machine needs only Python 3.11+ and access to the package registries.

PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PROMETHEUS_DIR := $(TOOLS)/prometheus
PROMTOOL := $(PROMETHEUS_DIR)/usr/bin/promtool
NODE_CLIENT := tests/node/node_modules/toxiproxy-node-client/package.json
CHROMIUM := /usr/bin/chromium
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test install lint typecheck unit chaos chaos-short dashboards mutation

run: install
	@$(MAKE) --no-print-directory $(PROMTOOL) \
		|| echo "make run: Prometheus could not be unpacked; metrics are served, not stored"
	$(VENV)/bin/kizo up

test: install $(PROMTOOL) $(NODE_CLIENT) $(CHROMIUM) lint typecheck unit

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"

install: $(UV)
	$(UV) sync --locked --quiet --python $(PYTHON)

# Prometheus and promtool from Debian's package, unpacked under .tools (no root, no service
# started): the rule tests need promtool, and `kizo up` starts Prometheus when it finds it.
$(PROMTOOL):
	rm -rf $(PROMETHEUS_DIR) && mkdir -p $(PROMETHEUS_DIR)/deb
	cd $(PROMETHEUS_DIR)/deb && { apt-get download -qq prometheus 2>/dev/null \
		|| { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download -qq prometheus; }; }
	dpkg -x $(PROMETHEUS_DIR)/deb/prometheus_*.deb $(PROMETHEUS_DIR)
	rm -rf $(PROMETHEUS_DIR)/deb
	$(PROMTOOL) --version > /dev/null

# Toxiproxy's Node client for its compatibility test, as locked in tests/node (Debian's nodejs
# and npm installed first when missing and root).
$(NODE_CLIENT): tests/node/package-lock.json
	command -v npm > /dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm; }
	cd tests/node && npm ci --silent --no-audit --no-fund
	touch $@

# Debian's Chromium for the browser tests of the web pages (Playwright cannot download its own
# browsers here); installed when missing and root, else the tests say what is missing.
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else echo "make test: $(CHROMIUM) is missing and only root can install it: the browser tests will fail"; fi

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

typecheck:
	$(VENV)/bin/mypy

# loadgroup: the browser tests (one xdist group) share one system and one browser on one worker.
unit:
	$(VENV)/bin/pytest -n 2 --dist loadgroup --durations=15

# The short fault-injection subset on its own (also part of `make test`): four scenarios end to
# end and a broken build caught under faults (.github/workflows/ci.yml runs it as a job).
chaos-short: install
	$(VENV)/bin/pytest -n 2 tests/test_chaos_scenarios.py

# The fault-injection job: every scenario and the broken build (`make test` runs four scenarios and the broken build itself).
chaos:
	.ci/chaos

# observability/grafana/dashboards/*.json from observability/dashboards.py (a test compares them)
dashboards: install
	$(VENV)/bin/python observability/dashboards.py

# Mutation testing (docs/testing.md), not part of `make test`: mutmut mutates the modules named in
# pyproject.toml [tool.mutmut] and runs their fast tests against each mutant. Results are kept in
# mutants/ between runs (only changed functions run again). MUTANTS narrows it by name glob, e.g.
# `make mutation MUTANTS='engine._decide*'`; the whole run is bounded by MUTATION_TIMEOUT_S.
MUTATION_CHILDREN ?= 2
MUTATION_TIMEOUT_S ?= 3600
MUTANTS ?=
mutation: install
	timeout $(MUTATION_TIMEOUT_S) $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(MUTANTS)
	$(VENV)/bin/mutmut results
