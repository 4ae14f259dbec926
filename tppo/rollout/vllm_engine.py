"""T-PPO windows on vLLM (optional extra ``tppo[vllm]``), behind the ``RolloutEngine`` Protocol.

Every window sends each row as one request: its prompt plus its response so far as
``prompt_token_ids`` (vLLM's prefix cache reuses the KV of what it has seen), with
``max_tokens`` = min(W, what the row's cap leaves). vLLM's continuous batching then
gives finished rows' slots to the others, which is what the embedded engine's
compaction and in-window refill do by hand. The log-probs returned are those of the
distribution sampled from (``logprobs_mode="processed_logprobs"``: after the
temperature), the same quantity the trainer recomputes; top-p/top-k truncation is
refused because vLLM would fold it into the recorded log-probs.

What was checked against vLLM 0.33.0's source (docs/scaling.md has the list), and what
it decides here:

* **Weights**: after each policy update the trainer's weights go to every vLLM worker
  through vLLM's own route, ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator":
  ...})`` (``v1/worker/gpu_worker.py``: an in-place ``load_weights`` between the loader's
  set-up and finish), then ``reset_prefix_cache`` (cached KV came from the old weights).
  vLLM's loaders take Hugging Face names and cut each tensor-parallel shard themselves;
  FSDP2's sharded DTensors are gathered to full tensors first.
* **Executors**: one process, ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (set, not defaulted:
  the engine core must live in this process to take the weights); tensor parallel > 1
  uses vLLM's multiprocess executor, to which the weights are sent as CPU tensors; under
  torchrun, every rank runs its own vLLM with ``distributed_executor_backend=
  "external_launcher"`` (tensor parallel 1 per rank; > 1 under torchrun is refused).
* **Sampling**: vLLM rejects temperatures above 2 and silently raises those in (0, 0.01)
  to 0.01, which would make its log-probs another distribution than the trainer's: both
  are refused when the engine is built. ``max_model_len`` = the longest prompt the task
  admits + L, so a row can only stop at its window, its cap, or a stop token; any other
  finish reason is an error naming the row, never a silent carry-over.
* **Seeds**: in-process vLLM reseeds Python's, numpy's and torch's global generators when
  it starts; they are restored, so the trainer's seeding stands.

Status: CPU-checked against vLLM's real classes by ``make test-vllm`` (SamplingParams,
EngineArgs, CompletionOutput); it has not run on a GPU yet (tests/gpu/ is ready for that).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from typing import Any, Iterable, Sequence

import torch

from tppo.config import RolloutConfig
from tppo.lora import merged_state_dict
from tppo.rollout.base import PromptItem, RolloutStats, Row, WindowBatch
from tppo.rollout.slots import SlotFiller

# vLLM 0.33 SamplingParams: temperature in [0, 2]; (0, 0.01) is raised to 0.01 with a warning.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 2.0
FINISH_REASONS = ("stop", "length")  # what a window can end with; "abort", "error", "repetition" are errors


def _import_vllm():
    try:
        import vllm
    except ImportError as e:  # an optional extra: say how to get it
        raise ImportError("the vLLM rollout engine needs vLLM: pip install 'tppo[vllm]' (on a machine with a GPU)") from e
    return vllm


# ---------------------------------------------------------------------- pure helpers (tested against vLLM's classes)


def check_rollout_config(cfg: RolloutConfig) -> None:
    """Refuse the settings vLLM would run differently from the trainer's recomputation."""
    if not cfg.remove_finished:
        raise ValueError("rollout.remove_finished=false is the padded baseline of the embedded engine; vLLM always "
                         "removes finished rows (continuous batching)")
    if cfg.refill_within_window:
        raise ValueError("rollout.refill_within_window is the embedded engine's: the vLLM engine sends each window's rows as "
                         "one batch of requests and admits new prompts at the next window")
    if cfg.window_mode != "tokens":
        raise ValueError("rollout.window_mode=steps (a window of W decode steps) is the embedded engine's; vLLM gives every "
                         "request max_tokens = W (window_mode tokens)")
    if cfg.top_p < 1.0 or cfg.top_k > 0:
        raise ValueError("the vLLM engine needs rollout.top_p=1 and rollout.top_k=0 (its recorded log-probs would "
                         "include the truncation, the trainer's recomputed ones do not)")
    if cfg.temperature > MAX_TEMPERATURE or 0 < cfg.temperature < MIN_TEMPERATURE:
        raise ValueError(f"the vLLM engine needs rollout.temperature 0 or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}] "
                         f"(got {cfg.temperature}): vLLM refuses higher ones and raises lower ones to {MIN_TEMPERATURE}, "
                         f"so its log-probs would not be those of the trainer's temperature")


def llm_kwargs(cfg: RolloutConfig, *, model_path: str, dtype: str, gpu_memory_utilization: float, tensor_parallel_size: int,
               sleep: bool, max_model_len: int, world_size: int) -> dict[str, Any]:
    """The keyword arguments of ``vllm.LLM`` (every one a field of vLLM's ``EngineArgs``)."""
    if world_size > 1 and tensor_parallel_size > 1:
        raise ValueError("rollout.engine=vllm under torchrun supports rollout.vllm_tensor_parallel_size=1 (one vLLM per "
                         "rank); tensor parallelism inside data-parallel ranks is not implemented")
    kw = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=cfg.seed, gpu_memory_utilization=gpu_memory_utilization,
              tensor_parallel_size=tensor_parallel_size, enable_sleep_mode=sleep, enable_prefix_caching=True,
              logprobs_mode="processed_logprobs", max_model_len=max_model_len)
    if world_size > 1:  # torchrun: each rank's vLLM on its own device, in its process (vLLM's route for this)
        kw["distributed_executor_backend"] = "external_launcher"
    return kw


def sampling_kwargs(cfg: RolloutConfig, row: Row, W: int, seed: int, eos: Sequence[int]) -> dict[str, Any]:
    """The keyword arguments of ``vllm.SamplingParams`` for one row's window."""
    room = row.max_response_tokens - len(row.response_ids)
    return dict(n=1, max_tokens=min(W, room), temperature=cfg.temperature, top_p=1.0, top_k=0, logprobs=0,
                stop_token_ids=[] if cfg.ignore_eos else list(eos), ignore_eos=cfg.ignore_eos, seed=seed,
                detokenize=False, skip_special_tokens=False)


def apply_completion(row: Row, completion, version: int, max_tokens: int, eos: Sequence[int], ignore_eos: bool) -> int:
    """Append a vLLM ``CompletionOutput``'s tokens and log-probs to ``row`` and set how it
    ended: "stop" (an EOS or a stop token, which stays the last token) finishes it as
    ``eos``; "length" at the row's cap finishes it as ``length``; "length" after
    ``max_tokens`` (the window) leaves it running (carried over). Anything else raises.
    Returns the number of new tokens."""
    ids = list(completion.token_ids)
    reason = completion.finish_reason
    if reason not in FINISH_REASONS or (not ids and row.max_response_tokens > len(row.response_ids)):
        raise RuntimeError(f"vLLM ended row {row.uid} (prompt {row.prompt_id}) with finish_reason={reason!r} after "
                           f"{len(ids)} tokens; expected 'stop' or 'length' with at least one token")
    row.response_ids += ids
    row.logprobs += [float(lp[t].logprob) for lp, t in zip(completion.logprobs, ids)]
    row.versions += [version] * len(ids)
    if reason == "stop" and not ignore_eos:
        row.finish_reason = "eos"
    elif len(row.response_ids) >= row.max_response_tokens:
        row.finish_reason = "length"
    elif len(ids) < max_tokens:  # "length" before the window's end: the context limit, which max_model_len rules out
        raise RuntimeError(f"vLLM stopped row {row.uid} after {len(ids)} of {max_tokens} tokens with 'length' below its cap "
                           f"({len(row.response_ids)} of {row.max_response_tokens}): max_model_len too small?")
    return len(ids)


def weights_for_vllm(model: torch.nn.Module, to_cpu: bool) -> list[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) of every weight: FSDP2's sharded DTensors gathered
    (a collective: every rank calls it), on the CPU for vLLM's multiprocess executor. A LoRA
    policy sends its merged weights under the base model's names (tppo/lora.py)."""
    out = []
    for name, t in merged_state_dict(model).items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out.append((name, t.detach().cpu() if to_cpu else t.detach()))
    return out


@contextlib.contextmanager
def preserved_rng():
    """Restore Python's, numpy's and torch's (CPU and CUDA) global generators after the
    block: in-process vLLM reseeds them all when it starts."""
    import numpy as np

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


# ---------------------------------------------------------------------- the engine


class VLLMEngine(SlotFiller):
    """Windowed generation on a colocated ``vllm.LLM``; implements ``RolloutEngine``.

    Args:
        cfg: the rollout config (W, L, slots, sampling).
        prompts: the prompt stream.
        model_path: local checkpoint (or hub id) vLLM loads at start (the policy's initial weights).
        eos_token_ids: token ids that finish a response.
        max_prompt_tokens: the longest prompt the task admits (max_model_len = it + L).
        gpu_memory_utilization, tensor_parallel_size, dtype: passed to ``vllm.LLM``.
        sleep_between_windows: free vLLM's memory while the trainer updates.
        world_size: data-parallel ranks (> 1: torchrun, one vLLM per rank).
    """

    def __init__(self, cfg: RolloutConfig, prompts: Iterable[PromptItem], *, model_path: str, eos_token_ids: int | Iterable[int],
                 max_prompt_tokens: int = 4096, gpu_memory_utilization: float = 0.4, tensor_parallel_size: int = 1,
                 dtype: str = "bfloat16", sleep_between_windows: bool = False, world_size: int = 1) -> None:
        super().__init__(cfg, prompts)
        check_rollout_config(cfg)
        vllm = _import_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core must live here to take new weights
        self.eos = sorted({eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids))
        self.sleep_between_windows = sleep_between_windows
        self.weights_to_cpu = tensor_parallel_size > 1  # the multiprocess executor pickles them
        with preserved_rng():
            self.llm = vllm.LLM(**llm_kwargs(cfg, model_path=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                                             tensor_parallel_size=tensor_parallel_size, sleep=sleep_between_windows,
                                             max_model_len=max_prompt_tokens + cfg.max_response_tokens, world_size=world_size))
        self._sampling = vllm.SamplingParams
        self._tokens_prompt = vllm.TokensPrompt
        self._loaded_version = 0
        self._request_seed = cfg.seed
        self.asleep = False

    # ------------------------------------------------------------------ the Protocol

    def generate_window(self, model: torch.nn.Module, version: int, window_tokens: int | None = None) -> WindowBatch:
        W = self.window_of(window_tokens)
        rows = self._take_rows(self.cfg.num_slots, list(self._carried))
        self._wake()
        # every rank, rows or none: under train.fsdp gathering the sharded weights is a collective, and a rank
        # whose stream ran dry must not leave the others waiting in it
        self.sync_weights(model, version)
        if not rows:
            self._sleep()
            return self._empty_window()
        starts = [len(r.response_ids) for r in rows]
        t0 = time.perf_counter()
        params = [sampling_kwargs(self.cfg, r, W, self._next_seed(), self.eos) for r in rows]
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=r.prompt_ids + r.response_ids) for r in rows],
                                    [self._sampling(**p) for p in params], use_tqdm=False)
        elapsed = time.perf_counter() - t0
        new_tokens = [apply_completion(r, out.outputs[0], version, p["max_tokens"], self.eos, self.cfg.ignore_eos)
                      for r, out, p in zip(rows, outputs, params)]
        self._sleep()
        prefill = sum(len(r.prompt_ids) + s for r, s in zip(rows, starts))
        stats = RolloutStats(slots=self.cfg.num_slots, decode_steps=max(new_tokens, default=0), generated_tokens=sum(new_tokens),
                             prefill_tokens=prefill, prefill_positions=prefill, prefill_s=0.0, decode_s=elapsed,  # varlen: no padding
                             row_steps=sum(new_tokens),  # continuous batching: a finished sequence leaves the batch
                             kv_positions=(kv := sum(n * (len(r.prompt_ids) + s) + n * (n - 1) // 2 for r, s, n in zip(rows, starts, new_tokens))),
                             cache_positions=kv, prefill_calls=1)  # paged attention reads each row's own context
        return self._close_window(rows, starts, stats)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "request_seed": self._request_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._request_seed = state["request_seed"]
        self._loaded_version = -1  # the checkpoint's weights must be pushed before the next window

    # ------------------------------------------------------------------ helpers

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Load the trainer's current weights into every vLLM worker when they changed
        since the last window (vLLM's in-place ``reload_weights``), then drop the prefix
        cache, whose KV the old weights computed."""
        if version == self._loaded_version:
            return
        weights = weights_for_vllm(model, to_cpu=self.weights_to_cpu)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()
        self._loaded_version = version

    def _next_seed(self) -> int:
        self._request_seed += 1  # one seed per request: a window replays exactly given the engine state
        return self._request_seed

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _sleep(self) -> None:
        if self.sleep_between_windows:
            self.llm.sleep(level=1)
            self.asleep = True
