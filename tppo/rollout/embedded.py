"""The embedded engine: windowed generation with carry-over and refill on any HF causal LM.

One window (T-PPO spec, steps 1, 2, 8):

1. fill the generation batch: carried-over rows first, then new prompts, each
   repeated G times, in whole groups while free slots remain;
2. prefill every row's ``prompt + response so far`` with the current weights, left
   padded, into a preallocated (static) KV cache sized for this window;
3. decode at most W tokens per row; a row finishes on EOS or at its cap L; rows that
   finish leave the decode batch at once (``remove_finished``), so no compute is spent
   on them; rows that exhaust W are cut and carried over.

The synchronous PPO rollout is the same engine with ``window_tokens ==
max_response_tokens`` (every row finishes in its only window), and the naive
``model.generate``-like baseline adds ``remove_finished=False``.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Iterable, Iterator

import torch
from transformers import StaticCache

from tppo.config import RolloutConfig
from tppo.rollout.base import PromptItem, RolloutStats, Row, WindowBatch
from tppo.rollout.sampling import sample_tokens

_REASONS = {1: "eos", 2: "length"}


class EmbeddedEngine:
    """Windowed generation engine (see module docstring); implements ``RolloutEngine``."""

    def __init__(
        self,
        cfg: RolloutConfig,
        prompts: Iterable[PromptItem],
        *,
        eos_token_ids: int | Iterable[int],
        pad_token_id: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.cfg = cfg
        self.prompts: Iterator[PromptItem] = iter(prompts)
        self.eos_token_ids = torch.tensor(sorted({eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids)))
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._carried: list[Row] = []
        self._next_uid = 0
        self.exhausted = False

    # ------------------------------------------------------------------ public API

    @property
    def carried(self) -> list[Row]:
        return list(self._carried)

    def generate_window(self, model: torch.nn.Module, version: int) -> WindowBatch:
        rows = self._fill()
        starts = [len(r.response_ids) for r in rows]
        stats = self._run_window(model, rows, version) if rows else RolloutStats(self.cfg.num_slots, 0, 0, 0, 0.0, 0.0)
        for row in rows:
            row.windows += 1
        # Later windows extend copies, so the returned batch stays as it is.
        self._carried = [r.copy() for r in rows if not r.finished]
        return WindowBatch(rows=rows, window_start=starts, stats=stats)

    def state_dict(self) -> dict[str, Any]:
        return {
            # Snapshots: the live rows keep growing in the next window.
            "carried": [dataclasses.asdict(r) for r in self._carried],
            "next_uid": self._next_uid,
            "generator": self.generator.get_state(),
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._carried = [Row(**d).copy() for d in state["carried"]]
        self._next_uid = state["next_uid"]
        self.generator.set_state(state["generator"])
        self.exhausted = state["exhausted"]

    # ------------------------------------------------------------------ step 1: fill

    def _fill(self) -> list[Row]:
        """Carried rows first, then whole groups of G new rows while slots are free."""
        rows = list(self._carried)
        G = self.cfg.samples_per_prompt
        while not self.exhausted and self.cfg.num_slots - len(rows) >= G:
            try:
                item = next(self.prompts)
            except StopIteration:
                self.exhausted = True
                break
            rows.extend(self._new_rows(item))
        return rows

    def _new_rows(self, item: PromptItem) -> list[Row]:
        if not item.prompt_ids:
            raise ValueError(f"prompt {item.prompt_id} is empty: every prompt needs at least one token")
        cap = min(item.max_response_tokens or self.cfg.max_response_tokens, self.cfg.max_response_tokens)
        if cap < 1:
            raise ValueError(f"prompt {item.prompt_id}: max_response_tokens must be >= 1 (got {cap})")
        rows = []
        for k in range(self.cfg.samples_per_prompt):
            rows.append(Row(self._next_uid, item.prompt_id, k, list(item.prompt_ids), dict(item.meta), cap))
            self._next_uid += 1
        return rows

    # ------------------------------------------------------------------ step 2: generate

    @torch.inference_mode()
    def _run_window(self, model: torch.nn.Module, rows: list[Row], version: int) -> RolloutStats:
        was_training = model.training
        model.eval()
        try:
            return self._decode(model, rows, version)
        finally:
            model.train(was_training)

    def _decode(self, model: torch.nn.Module, rows: list[Row], version: int) -> RolloutStats:
        dev, cfg = self.device, self.cfg
        B = len(rows)
        start_len = torch.tensor([len(r.response_ids) for r in rows], device=dev)
        cap = torch.tensor([r.max_response_tokens for r in rows], device=dev)
        window_end = torch.minimum(cap, start_len + cfg.window_tokens)
        n_steps = int((window_end - start_len).max())

        t0 = time.perf_counter()
        ids, attn, pos = _left_pad([r.prompt_ids + r.response_ids for r in rows], self.pad_token_id, dev)
        P = ids.shape[1]
        cache = StaticCache(config=model.config, max_cache_len=P + n_steps)
        attn_buf = torch.zeros(B, P + n_steps, dtype=torch.long, device=dev)
        attn_buf[:, :P] = attn
        cache_kw = _cache_kwarg(model)
        logits = _forward(model, cache_kw, ids, attn, pos, cache)[:, -1]
        prefill_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        out_tok = torch.full((B, n_steps), self.pad_token_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros(B, n_steps, dtype=torch.float32, device=dev)
        resp_len = start_len.clone()
        reason = torch.zeros(B, dtype=torch.long, device=dev)  # 0 running/cut, 1 eos, 2 length
        active = torch.arange(B, device=dev)  # row index of each decode-batch entry
        alive = torch.ones(B, dtype=torch.bool, device=dev)  # decode-batch entry still generating
        next_pos = pos[:, -1] + 1
        eos_ids = self.eos_token_ids.to(dev)
        steps = generated = 0
        for s in range(n_steps):
            tok, lp = sample_tokens(
                logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=self.generator
            )
            rows_now = active[alive]
            out_tok[rows_now, s] = tok[alive]
            out_lp[rows_now, s] = lp[alive]
            resp_len[rows_now] += 1
            steps += 1
            generated += rows_now.numel()
            is_eos = torch.isin(tok, eos_ids) & alive & (not cfg.ignore_eos)
            at_cap = (resp_len[active] >= cap[active]) & alive
            reason[active[is_eos]] = 1
            reason[active[at_cap & ~is_eos]] = 2
            alive = alive & ~is_eos & (resp_len[active] < window_end[active])
            if not bool(alive.any()) or s == n_steps - 1:
                break
            if cfg.remove_finished and not bool(alive.all()):
                keep = alive.nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                active, tok, next_pos, attn_buf = active[keep], tok[keep], next_pos[keep], attn_buf[keep]
                alive = alive[keep]
            attn_buf[:, P + s] = 1
            step_ids, step_pos = tok.unsqueeze(-1), next_pos.unsqueeze(-1)
            logits = _forward(model, cache_kw, step_ids, attn_buf[:, : P + s + 1], step_pos, cache)[:, -1]
            next_pos = next_pos + 1
        decode_s = time.perf_counter() - t0

        _commit(rows, out_tok, out_lp, resp_len - start_len, reason, version)
        return RolloutStats(
            slots=cfg.num_slots,
            decode_steps=steps,
            generated_tokens=generated,
            prefill_tokens=int(attn.sum()),
            prefill_s=prefill_s,
            decode_s=decode_s,
        )


# ---------------------------------------------------------------------- helpers


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids), each (B, P), sequences right-aligned;
    positions count real tokens only, so a row's first token is at position 0."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s) :] = torch.tensor(s, dtype=torch.long)
        attn[i, P - len(s) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), attn.to(device), pos.to(device)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.x names the KV-cache argument ``cache``; earlier ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _forward(model, cache_kw: str, ids, attn, pos, cache) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{cache_kw: cache})
    return out.logits


def _commit(rows: list[Row], out_tok, out_lp, n_new, reason, version: int) -> None:
    """Append each row's new tokens (contiguous from column 0) to its lists."""
    toks, lps, counts, reasons = out_tok.tolist(), out_lp.tolist(), n_new.tolist(), reason.tolist()
    for row, t, lp, n, why in zip(rows, toks, lps, counts, reasons):
        row.response_ids.extend(t[:n])
        row.logprobs.extend(lp[:n])
        row.versions.extend([version] * n)
        row.finish_reason = _REASONS.get(why)

