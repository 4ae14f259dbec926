"""The vLLM engine against vLLM's own classes, on the CPU (``make test-vllm``: its own
virtualenv with the ``vllm`` extra and the torch vLLM pins). A fake that records calls only
restates our assumptions; these build vLLM's real ``SamplingParams``, ``EngineArgs``,
``CompletionOutput`` and ``Logprob`` so that vLLM's validation and field names decide.
Skipped where vLLM is not installed (``make test``)."""

from __future__ import annotations

import dataclasses

import pytest

vllm = pytest.importorskip("vllm", reason="make test-vllm installs vLLM in .venv-vllm")

from tppo.config import RolloutConfig  # noqa: E402
from tppo.rollout import Row  # noqa: E402
from tppo.rollout.vllm_engine import MAX_TEMPERATURE, MIN_TEMPERATURE, check_rollout_config, llm_kwargs, sampling_kwargs  # noqa: E402
from vllm_cases import CASES, run_case  # noqa: E402

CONFIGS = [dict(temperature=t, ignore_eos=e) for t in (0.0, MIN_TEMPERATURE, 0.7, 1.0, MAX_TEMPERATURE) for e in (False, True)]


@pytest.mark.parametrize("kw", CONFIGS, ids=str)
@pytest.mark.parametrize("so_far", [0, 20, 23])
def test_sampling_params_of_every_accepted_config_pass_vllm_validation_unchanged(kw, so_far):
    cfg = RolloutConfig(window_tokens=8, max_response_tokens=24, **kw)
    check_rollout_config(cfg)
    row = Row(0, 0, 0, [1, 2], {}, 24, [5] * so_far, [0.0] * so_far, [0] * so_far)
    params = vllm.SamplingParams(**sampling_kwargs(cfg, row, 8, seed=3, eos=[2, 7]))
    assert params.temperature == cfg.temperature  # not silently raised: the trainer divides by the same value
    assert params.max_tokens == min(8, 24 - so_far) and params.ignore_eos == cfg.ignore_eos
    assert list(params.stop_token_ids or []) == ([] if cfg.ignore_eos else [2, 7])


@pytest.mark.parametrize("temperature", [2.5, 0.005])
def test_temperatures_vllm_would_change_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        check_rollout_config(RolloutConfig(temperature=temperature))


@pytest.mark.parametrize("world_size", [1, 2])
def test_llm_keyword_arguments_are_engine_args_fields(world_size):
    from vllm.engine.arg_utils import EngineArgs

    kw = llm_kwargs(RolloutConfig(), model_path="m", dtype="bfloat16", gpu_memory_utilization=0.4, tensor_parallel_size=1,
                    sleep=True, max_model_len=2048, world_size=world_size)
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert set(kw) - {"model"} <= fields and "model" in fields


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_output_handling_on_vllm_completion_outputs(case):
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput

    if case[-1] == "error":
        with pytest.raises(RuntimeError, match="vLLM"):
            run_case(CompletionOutput, Logprob, case)
        return
    row, n = run_case(CompletionOutput, Logprob, case)
    assert row.finish_reason == case[-1] and n == len(case[1])


@pytest.mark.parametrize("module,cls", [("llama", "LlamaForCausalLM"), ("qwen2", "Qwen2ForCausalLM")])
def test_the_weight_names_sent_are_those_vllm_stacks(module, cls):
    """The engine sends Hugging Face names (tests/test_rollout.py pins that they are the
    checkpoint's); vLLM's Llama and Qwen2 classes stack q/k/v and gate/up from exactly those."""
    import importlib

    model_cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module}"), cls)
    packed = model_cls.packed_modules_mapping
    assert packed["qkv_proj"] == ["q_proj", "k_proj", "v_proj"] and packed["gate_up_proj"] == ["gate_proj", "up_proj"]
