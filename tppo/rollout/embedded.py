"""The embedded engine: windowed generation with carry-over and refill on any HF causal LM.

One window (T-PPO spec, steps 1, 2, 8):

1. fill the generation batch: carried-over rows first, then new prompts, each
   repeated G times, in whole groups while free slots remain;
2. prefill every row's ``prompt + response so far`` with the current weights, left
   padded, into a preallocated (static) KV cache sized for this window;
3. decode at most W tokens per row; a row finishes on EOS or at its cap L; rows that
   finish leave the decode batch at once (``remove_finished``), so no compute is spent
   on them (compaction waits for 1/8 of the batch to be done, as each one copies the
   KV cache); with ``refill_within_window`` new prompts take the freed slots at once;
   rows still running after W steps are cut and carried over.

All rows of a window decode in lockstep: they share the cache's write position, each
with its own position ids (left padding). A row admitted mid-window is prefilled into
a fresh cache whose write offset is set so that its prompt ends at the shared position.

The synchronous PPO rollout is the same engine with ``window_tokens ==
max_response_tokens`` (every row finishes in its only window), and the naive
``model.generate``-like baseline adds ``remove_finished=False``.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Iterable

import torch
from transformers import StaticCache

from tppo.config import RolloutConfig
from tppo.models import accepts_logits_to_keep
from tppo.rollout.base import PromptItem, RolloutStats, Row, WindowBatch
from tppo.rollout.sampling import sample_tokens
from tppo.rollout.slots import SlotFiller

_REASONS = {1: "eos", 2: "length"}
# Compact the decode batch once this share of its entries is done (see _Window._compact).
COMPACT_FRACTION = 0.125


class EmbeddedEngine(SlotFiller):
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
        super().__init__(cfg, prompts)
        eos = {eos_token_ids} if isinstance(eos_token_ids, int) else set(eos_token_ids)
        self.eos_token_ids = torch.tensor(sorted(eos))
        self.pad_token_id = pad_token_id
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)

    # ------------------------------------------------------------------ public API

    def generate_window(self, model: torch.nn.Module, version: int, window_tokens: int | None = None) -> WindowBatch:
        rows = self._take_rows(self.cfg.num_slots, list(self._carried))
        if not rows:
            return self._empty_window()
        starts = [len(r.response_ids) for r in rows]
        stats = self._run_window(model, rows, version, self.window_of(window_tokens))
        starts += [0] * (len(rows) - len(starts))  # rows admitted mid-window start at 0
        return self._close_window(rows, starts, stats)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])

    # ------------------------------------------------------------------ step 2: generate

    @torch.inference_mode()
    def _run_window(self, model: torch.nn.Module, rows: list[Row], version: int, W: int) -> RolloutStats:
        was_training = model.training
        model.eval()
        try:
            window = _Window(self, model, rows, W)
            return window.run(version)
        finally:
            model.train(was_training)


class _Window:
    """The decode state of one window: a lockstep batch over a shared static KV cache.

    Per-row tensors are indexed by the row's position in ``rows`` (which grows when
    rows are admitted mid-window); decode-batch tensors by the entry's position in the
    decode batch, ``active[j]`` being its row.
    """

    def __init__(self, engine: EmbeddedEngine, model: torch.nn.Module, rows: list[Row], W: int) -> None:
        self.engine, self.model, self.rows, self.cfg = engine, model, rows, engine.cfg
        self.dev = engine.device
        self.cache_kw = cache_kwarg(model)
        self.keep_kw = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        lens = torch.tensor([len(r.response_ids) for r in rows], device=self.dev)
        cap = torch.tensor([r.max_response_tokens for r in rows], device=self.dev)
        self.W = W
        self.n_steps = int((torch.minimum(cap, lens + W) - lens).max())  # the window's decode steps for the rows it starts with
        # window_mode tokens: a row admitted mid-window (refill) also gets up to W tokens, so the
        # window may run W steps past its first rows' end; steps: it ends after n_steps (rollout.window_mode)
        self.tokens_mode = self.cfg.refill_within_window and self.cfg.window_mode == "tokens"
        self.horizon = self.n_steps + (W if self.tokens_mode else 0)
        self.start_len, self.cap = lens, cap
        self.window_end = torch.minimum(cap, lens + W)
        self.first_col = torch.zeros(len(rows), dtype=torch.long, device=self.dev)
        self.prefill_s = 0.0
        self.prefill_tokens = 0
        self.prefill_positions = 0  # what the prefill forwards compute: left padding included
        self.prefill_calls = 0
        self.copy_positions = 0  # KV cache positions copied: compactions and in-window joins

    def run(self, version: int) -> RolloutStats:
        logits = self._prefill()
        t0 = time.perf_counter()
        B, pad = len(self.rows), self.engine.pad_token_id
        self.out_tok = torch.full((B, self.horizon), pad, dtype=torch.long, device=self.dev)
        self.out_lp = torch.zeros(B, self.horizon, dtype=torch.float32, device=self.dev)
        self.resp_len = self.start_len.clone()
        self.reason = torch.zeros(B, dtype=torch.long, device=self.dev)  # 0 running/cut, 1 eos, 2 length
        steps = generated = row_steps = 0
        self.kv_positions = self.cache_positions = 0
        for s in range(self.horizon):
            row_steps += int(self.active.numel())  # the decode batch this step computes, dead entries included
            generated += self._sample(logits, s)
            steps += 1
            if s == self.horizon - 1:
                break
            if self.cfg.refill_within_window and s < self.n_steps - 1:  # admissions within the window's first n_steps
                self._admit(s)
            if self.cfg.remove_finished:
                self._compact()
            if not bool(self.alive.any()):
                break
            logits = self._feed(s)
        decode_s = time.perf_counter() - t0 - self.admit_s
        self._commit(version)
        return RolloutStats(self.cfg.num_slots, steps, generated, self.prefill_tokens, self.prefill_s + self.admit_s, decode_s, row_steps,
                            self.kv_positions, self.cache_positions, self.prefill_calls, self.copy_positions, self.prefill_positions)

    # ------------------------------------------------------------------ phases

    def _prefill(self) -> torch.Tensor:
        """Batched prefill of ``prompt + response so far`` for every row; logits of the last position."""
        t0 = time.perf_counter()
        ids, attn, pos = _left_pad([r.prompt_ids + r.response_ids for r in self.rows], self.engine.pad_token_id, self.dev)
        self.P = ids.shape[1]
        self.width = self.P + self.horizon  # the static cache's length: the prefill and every decode step
        self.cache = StaticCache(config=self.model.config, max_cache_len=self.width)
        self.attn_buf = torch.zeros(len(self.rows), self.width, dtype=torch.long, device=self.dev)
        self.attn_buf[:, : self.P] = attn
        logits = self._forward(ids, attn, pos, self.cache)
        self.active = torch.arange(len(self.rows), device=self.dev)
        self.alive = torch.ones(len(self.rows), dtype=torch.bool, device=self.dev)
        self.next_pos = pos[:, -1] + 1
        self.prefill_tokens = int(attn.sum())
        self.prefill_positions = ids.numel()  # B x P: a prefill costs its padded batch (benchmarks/static_cache.py)
        self.prefill_calls = 1
        self.prefill_s = time.perf_counter() - t0
        self.admit_s = 0.0
        return logits

    def _sample(self, logits: torch.Tensor, s: int) -> int:
        """Sample token s of every live decode entry, record it, mark finished/cut rows."""
        cfg = self.cfg
        tok, lp = sample_tokens(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=self.engine.generator)
        live_rows = self.active[self.alive]
        self.out_tok[live_rows, s] = tok[self.alive]
        self.out_lp[live_rows, s] = lp[self.alive]
        self.resp_len[live_rows] += 1
        is_eos = torch.isin(tok, self.engine.eos_token_ids.to(self.dev)) & self.alive & (not cfg.ignore_eos)
        at_cap = (self.resp_len[self.active] >= self.cap[self.active]) & self.alive
        self.reason[self.active[is_eos]] = 1
        self.reason[self.active[at_cap & ~is_eos]] = 2
        self.alive = self.alive & ~is_eos & (self.resp_len[self.active] < self.window_end[self.active])
        self.tok = tok
        return int(live_rows.numel())

    def _compact(self) -> None:
        """Drop decode entries whose row is done, so no compute is spent on them again.

        Each compaction copies the whole KV cache, so it waits until a share
        (``COMPACT_FRACTION``) of the batch is dead: copies stay rare, waste bounded.
        """
        dead = int((~self.alive).sum())
        if dead == 0 or (dead < COMPACT_FRACTION * self.alive.numel() and bool(self.alive.any())):
            return
        keep = self.alive.nonzero().squeeze(-1)
        self.cache.reorder_cache(keep)
        self.copy_positions += keep.numel() * self.width
        self.active, self.tok, self.next_pos = self.active[keep], self.tok[keep], self.next_pos[keep]
        self.attn_buf, self.alive = self.attn_buf[keep], self.alive[keep]

    def _admit(self, s: int) -> None:
        """Refill decode entries freed mid-window: new rows take them over in place at step s.

        A new row's prompt occupies cache positions ending at the shared write position
        P + s: ``prompt[:-1]`` is prefilled into a small fresh cache at offset
        P + s - (len - 1) and copied into the freed entries' rows of the shared cache;
        its last prompt token is fed with the other entries' tokens at P + s.
        """
        free = (~self.alive).nonzero().squeeze(-1)
        G = self.cfg.samples_per_prompt
        if free.numel() < G:
            return
        t0 = time.perf_counter()
        new = self.engine._take_rows(free.numel() - free.numel() % G, [])
        fits = [r for r in new if len(r.prompt_ids) - 1 <= self.P + s]
        self.engine._pending = [r for r in new if r not in fits] + self.engine._pending
        if fits:
            self._join(fits, free[: len(fits)], s)
        self.admit_s += time.perf_counter() - t0

    def _join(self, new: list[Row], entries: torch.Tensor, s: int) -> None:
        dev, write_pos = self.dev, self.P + s
        ids, attn, pos = _left_pad([r.prompt_ids[:-1] for r in new], self.engine.pad_token_id, dev)
        Q = ids.shape[1]
        new_cache = _cache_at_offset(self.cache, len(new), self.width, write_pos - Q, self.model.config)
        new_attn = torch.zeros(len(new), self.attn_buf.shape[1], dtype=torch.long, device=dev)
        self.prefill_calls += 1  # a join: a fresh cache of the whole width, its prompts' prefill, the copy
        self.copy_positions += len(new) * self.width
        if Q > 0:  # one-token prompts have nothing to prefill: their last token is fed below
            new_attn[:, write_pos - Q : write_pos] = attn
            self._forward(ids, new_attn[:, :write_pos], pos, new_cache)
            self.prefill_tokens += int(attn.sum())
            self.prefill_positions += ids.numel()
        for layer, new_layer in zip(self.cache.layers, new_cache.layers):
            layer.keys.index_copy_(0, entries, new_layer.keys)
            layer.values.index_copy_(0, entries, new_layer.values)
        self.attn_buf[entries] = new_attn
        self._add_rows(new, s)
        self.active[entries] = torch.arange(len(self.rows) - len(new), len(self.rows), device=dev)
        self.alive[entries] = True
        self.tok[entries] = torch.tensor([r.prompt_ids[-1] for r in new], device=dev)
        self.next_pos[entries] = torch.tensor([len(r.prompt_ids) - 1 for r in new], device=dev)

    def _add_rows(self, new: list[Row], s: int) -> None:
        """Extend the per-row tensors for rows joining at step s (first token at s + 1)."""
        dev, n = self.dev, len(new)
        self.rows.extend(new)
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        cap = torch.tensor([r.max_response_tokens for r in new], device=dev)
        self.start_len = torch.cat([self.start_len, zeros])
        self.resp_len = torch.cat([self.resp_len, zeros])
        self.reason = torch.cat([self.reason, zeros])
        self.cap = torch.cat([self.cap, cap])
        # tokens: W new tokens like every row; steps: cut with the others at the window's end
        self.window_end = torch.cat([self.window_end, cap.clamp(max=self.W if self.tokens_mode else self.n_steps - (s + 1))])
        self.first_col = torch.cat([self.first_col, torch.full((n,), s + 1, device=dev)])
        self.out_tok = torch.cat([self.out_tok, torch.full((n, self.horizon), self.engine.pad_token_id, device=dev)])
        self.out_lp = torch.cat([self.out_lp, torch.zeros(n, self.horizon, device=dev)])

    def _feed(self, s: int) -> torch.Tensor:
        """Feed each entry's latest token at the shared cache position P + s."""
        self.attn_buf[:, self.P + s] = 1
        ids, pos = self.tok.unsqueeze(-1), self.next_pos.unsqueeze(-1)
        self.kv_positions += ids.shape[0] * (self.P + s + 1)  # each entry attends over the shared cache up to P + s
        self.cache_positions += ids.shape[0] * self.width  # ... and a static cache's attention spans all of it
        logits = self._forward(ids, self.attn_buf[:, : self.P + s + 1], pos, self.cache)
        self.next_pos = self.next_pos + 1
        return logits

    def _forward(self, ids, attn, pos, cache) -> torch.Tensor:
        """Logits of the last position only (B, V): prefills skip the vocabulary projection
        of every prompt token (``logits_to_keep=1``, where the model supports it)."""
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{self.cache_kw: cache}, **self.keep_kw)
        return out.logits[:, -1]

    def _commit(self, version: int) -> None:
        """Append each row's new tokens (contiguous from its first column) to its lists."""
        n_new = (self.resp_len - self.start_len).tolist()
        toks, lps, firsts, reasons = self.out_tok.tolist(), self.out_lp.tolist(), self.first_col.tolist(), self.reason.tolist()
        for row, t, lp, c, n, why in zip(self.rows, toks, lps, firsts, n_new, reasons):
            row.response_ids.extend(t[c : c + n])
            row.logprobs.extend(lp[c : c + n])
            row.versions.extend([version] * n)
            row.finish_reason = _REASONS.get(why)


# ---------------------------------------------------------------------- helpers


def _left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, position_ids), each (B, P), sequences right-aligned;
    positions count real tokens only, so a row's first token is at position 0."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), P, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, P - len(s) :] = torch.tensor(s, dtype=torch.long)
            attn[i, P - len(s) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), attn.to(device), pos.to(device)


def _cache_at_offset(template: StaticCache, batch: int, max_len: int, offset: int, config) -> StaticCache:
    """A fresh static cache for ``batch`` rows whose first write lands at ``offset``.

    transformers' static layers keep their write position in ``cumulative_length`` and
    report length 0 (so masks assume offset 0) until their first write initializes them;
    so the layers are initialized here, shaped like ``template``'s, before the offset is
    set. This is the one place tppo relies on those internals (pinned by the refill tests).
    """
    cache = StaticCache(config=config, max_cache_len=max_len)
    for layer, like in zip(cache.layers, template.layers):
        shape = (batch, like.keys.shape[1], 0)
        layer.lazy_initialization(like.keys.new_empty(*shape, like.keys.shape[-1]), like.values.new_empty(*shape, like.values.shape[-1]))
        layer.cumulative_length = torch.tensor(offset, dtype=torch.long, device=like.keys.device)
    return cache


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.x names the KV-cache argument ``cache``; earlier ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
