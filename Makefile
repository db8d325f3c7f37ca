# Two commands on a fresh machine: `make serve` and `make test` (each installs first if needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install redis browser containers serve test lint bench bench-soak bench-soak-redis clean

install: $(STAMP) redis

# The Redis tests start a real redis-server: Debian's package, never a mock.
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends redis-server; }

# The web page test drives a real headless browser: Debian's chromium and its driver.
browser:
	@{ command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; }

# The compose end-to-end test builds its images from Debian packages (mmdebstrap) and runs
# them on podman (runc; netavark + aardvark-dns resolve service names; netavark sets up the
# containers' network with iptables, which Debian's netavark does not depend on).
containers:
	@{ command -v podman >/dev/null 2>&1 && command -v mmdebstrap >/dev/null 2>&1 \
		&& command -v runc >/dev/null 2>&1 && [ -x /usr/sbin/iptables ]; } || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		$$SUDO apt-get install -y -qq podman runc mmdebstrap \
			netavark aardvark-dns iptables uidmap ca-certificates; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: otherwise a torch requirement pulls several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,train,dev]'
	touch $(STAMP)

serve: install
	$(VENV)/bin/endofuse serve --host $(HOST) --port $(PORT) --models-dir models

test: install browser containers
	$(VENV)/bin/ruff check service training tests bench
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check service training tests bench
	$(VENV)/bin/ruff format --check service training tests bench

bench: install
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/peers.py --out docs/performance.md
	$(PY) bench/request_costs.py --out docs/performance.md
	$(PY) bench/serving.py --out docs/performance.md
	$(PY) bench/preprocess.py --out docs/performance.md
	$(PY) bench/redis_hop.py --out docs/performance.md
	$(PY) bench/overload.py --out docs/performance.md
	$(PY) bench/edge.py --out docs/performance.md
	$(PY) bench/decision_overhead.py --out docs/performance.md
	$(PY) bench/decision_cost.py --out docs/performance.md
	$(PY) bench/ood_cost.py --out docs/performance.md
	$(PY) bench/precision.py --model hyperkvasir-lgi --out docs/performance.md
	$(PY) bench/precision.py --model ham10000 --out docs/performance.md

# Ten minutes of abuse beside load, with the server's memory sampled throughout.
bench-soak: install
	$(PY) bench/soak.py --minutes 10 --out docs/performance.md

# Ten minutes of steady load on the Redis deployment: memory (API, worker, Redis) and p99.
bench-soak-redis: install
	$(PY) bench/soak_redis.py --minutes 10 --out docs/performance.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
