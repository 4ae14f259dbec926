"""T-PPO windows on vLLM (optional extra ``tppo[vllm]``), behind the ``RolloutEngine`` Protocol.

Every window sends each row as one request: its prompt plus its response so far as
``prompt_token_ids`` (vLLM's prefix cache reuses the KV of what it has seen), with
``max_tokens`` = min(W, what the row's cap leaves). vLLM's continuous batching then
gives finished rows' slots to the others, which is what the embedded engine's
compaction and in-window refill do by hand. The log-probs returned are those of the
distribution sampled from (``logprobs_mode="processed_logprobs"``: after the
temperature), the same quantity the trainer recomputes; top-p/top-k truncation is
refused because vLLM would fold it into the recorded log-probs.

Weights: after each policy update the trainer's weights are loaded into vLLM's model in
place (``load_weights``, the path of TRL's and OpenRLHF's colocated modes), so vLLM
runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). With ``sleep_between_windows``
vLLM sleeps after each window (level 1: weights offloaded, KV cache freed) so the
trainer's update has the GPU memory, and wakes before the next.

Status: written against the vLLM 0.1x Python API; CPU CI cannot run it. Its tests are in
tests/gpu/ and run only where a GPU and vLLM are present. TODO: run them on a GPU
(no accelerator was lent to the session that wrote this engine).
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterable

import torch

from tppo.config import RolloutConfig
from tppo.rollout.base import PromptItem, RolloutStats, Row, WindowBatch
from tppo.rollout.slots import SlotFiller


def _import_vllm():
    try:
        import vllm
    except ImportError as e:  # an optional extra: say how to get it
        raise ImportError("the vLLM rollout engine needs vLLM: pip install 'tppo[vllm]' (on a machine with a GPU)") from e
    return vllm


class VLLMEngine(SlotFiller):
    """Windowed generation on a colocated ``vllm.LLM``; implements ``RolloutEngine``.

    Args:
        cfg: the rollout config (W, L, slots, sampling).
        prompts: the prompt stream.
        model_path: local checkpoint vLLM loads at start (the policy's initial weights).
        eos_token_ids: token ids that finish a response.
        gpu_memory_utilization, tensor_parallel_size, dtype: passed to ``vllm.LLM``.
        sleep_between_windows: free vLLM's memory while the trainer updates.
    """

    def __init__(self, cfg: RolloutConfig, prompts: Iterable[PromptItem], *, model_path: str, eos_token_ids: int | Iterable[int],
                 gpu_memory_utilization: float = 0.4, tensor_parallel_size: int = 1, dtype: str = "bfloat16",
                 sleep_between_windows: bool = False) -> None:
        super().__init__(cfg, prompts)
        if not cfg.remove_finished:
            raise ValueError("rollout.remove_finished=false is the padded baseline of the embedded engine; vLLM always "
                             "removes finished rows (continuous batching)")
        if cfg.top_p < 1.0 or cfg.top_k > 0:
            # vLLM's processed log-probs would include the truncation; the trainer's do not
            raise ValueError("the vLLM engine needs rollout.top_p=1 and rollout.top_k=0 (its recorded log-probs would "
                             "include the truncation, the trainer's recomputed ones do not)")
        vllm = _import_vllm()
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model must live here to take new weights
        self.eos = sorted({eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids))
        self.sleep_between_windows = sleep_between_windows
        self.llm = vllm.LLM(model=model_path, tokenizer=model_path, dtype=dtype, seed=cfg.seed,
                            gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                            enable_sleep_mode=sleep_between_windows, enable_prefix_caching=True,
                            logprobs_mode="processed_logprobs")
        self._sampling = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt
        self._loaded_version = 0
        self._request_seed = cfg.seed
        self.asleep = False

    # ------------------------------------------------------------------ the Protocol

    def generate_window(self, model: torch.nn.Module, version: int, window_tokens: int | None = None) -> WindowBatch:
        W = self.window_of(window_tokens)
        rows = self._take_rows(self.cfg.num_slots, list(self._carried))
        if not rows:
            return self._empty_window()
        self._wake()
        self.sync_weights(model, version)
        starts = [len(r.response_ids) for r in rows]
        t0 = time.perf_counter()
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=r.prompt_ids + r.response_ids) for r in rows],
                                    [self._params(r, W) for r in rows], use_tqdm=False)
        elapsed = time.perf_counter() - t0
        new_tokens = [self._extend(r, out.outputs[0], version) for r, out in zip(rows, outputs)]
        if self.sleep_between_windows:
            self.llm.sleep(level=1)
            self.asleep = True
        stats = RolloutStats(slots=self.cfg.num_slots, decode_steps=max(new_tokens, default=0), generated_tokens=sum(new_tokens),
                             prefill_tokens=sum(len(r.prompt_ids) + s for r, s in zip(rows, starts)), prefill_s=0.0, decode_s=elapsed)
        return self._close_window(rows, starts, stats)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "request_seed": self._request_seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._request_seed = state["request_seed"]
        self._loaded_version = -1  # the checkpoint's weights must be pushed before the next window

    # ------------------------------------------------------------------ helpers

    def sync_weights(self, model: torch.nn.Module, version: int) -> None:
        """Load the trainer's current weights into vLLM when they changed since the last window."""
        if version == self._loaded_version:
            return
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        runner.model.load_weights(((name, p.detach()) for name, p in model.state_dict().items()))
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self._loaded_version = version

    def _params(self, row: Row, W: int):
        room = row.max_response_tokens - len(row.response_ids)
        self._request_seed += 1  # one seed per request: a window replays exactly given the engine state
        return self._sampling(n=1, max_tokens=min(W, room), temperature=self.cfg.temperature,
                              top_p=self.cfg.top_p, top_k=self.cfg.top_k if self.cfg.top_k > 0 else -1, logprobs=0,
                              stop_token_ids=[] if self.cfg.ignore_eos else self.eos, ignore_eos=self.cfg.ignore_eos,
                              seed=self._request_seed, detokenize=False, skip_special_tokens=False)

    def _extend(self, row: Row, completion, version: int) -> int:
        """Append a completion's tokens and log-probs to ``row``; finish it on EOS or its cap."""
        ids = list(completion.token_ids)
        row.response_ids += ids
        row.logprobs += [float(lp[t].logprob) for lp, t in zip(completion.logprobs, ids)]
        row.versions += [version] * len(ids)
        if ids and ids[-1] in self.eos and not self.cfg.ignore_eos:
            row.finish_reason = "eos"
        elif len(row.response_ids) >= row.max_response_tokens:
            row.finish_reason = "length"
        return len(ids)

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
