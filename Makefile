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

.PHONY: serve test lint system-deps

$(BIN)/robustdiff: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Redis and Prometheus are real servers in the tests; Fashion-MNIST trains the served models;
# docker-compose 1.29 validates the compose file offline (no Docker engine needed).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	[ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
		echo "installing$$missing with apt-get"; \
		$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

lint: $(BIN)/robustdiff
	$(BIN)/ruff check $(CODE) tests bench
	$(BIN)/ruff format --check $(CODE) tests bench
	$(BIN)/mypy $(CODE)

test: system-deps lint
	$(BIN)/pytest $(if $(TEST_SEED),--randomly-seed=$(TEST_SEED))

serve: $(BIN)/robustdiff
	$(BIN)/robustdiff serve
