"""THE training loop: T-PPO, and synchronous PPO as the same loop with W = L.

One step (T-PPO spec, "One training step, precisely"), as numbered in :meth:`Trainer.step`:

    1 fill the generation batch       (the engine: carried rows first, then new prompts)
    2 generate one window             (the engine: at most W tokens per row)
    3 score finished rows             (reward on the last response token)
    4 critic values                   (prompt + whole response so far, every row)
    5 advantages                      (EGAE over this window's tokens; GAE for PPO)
    6 update the policy               (PPO clipped loss on this window's tokens)
    7 update the critic               (finished rows, all their tokens, MC targets)
    8 carry over unfinished rows      (the engine keeps them)
    9 log / evaluate / checkpoint

Tensor frame used below: a step's rows are packed right-padded as ``prompt + response
so far`` (B, S); every per-token quantity lives in the *shifted* frame (B, S - 1) where
column j is about token j + 1: its log-prob comes from logits at j, its state value
V(s) (state = tokens 0..j) is the critic's output at j.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tppo import algos, distributed, lora, sharding
from tppo.advantages import compute_advantages, has_critic, policy_lambda, rows_with_values
from tppo.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from tppo.config import Config, ConfigError, diff_configs, load_config, save_config
from tppo.egae_bias import TruncationTracker
from tppo.evaluation import avg_at_k_se, decode_response, evaluate, run_generate_fn
from tppo.export import BASE_FILE
from tppo.metrics import MetricsLogger, sample_line, summary_line
from tppo.models import ModelSource, critic_from_policy, eos_token_ids, load_critic, load_pretrained, own_aligned_memory, save_pretrained
from tppo.monitoring import carry_metrics, round_metrics
from tppo.prefix import prefix_width, span_logprobs, span_starts
from tppo.rewards import RewardScorer, RewardSpecError, checked_rewards
from tppo.rollout import EmbeddedEngine, WindowBatch
from tppo.rundir import RunDirInUse, claim
from tppo.stopping import Interrupted, StopRequest
from tppo.tasks import ArithTask, ChainTask, Example, PromptSource, epoch_stream, load_task_data, prompt_text
from tppo.trackers import check_trackers, make_trackers
from tppo.updates import (BehaviorStats, StepBatch, WorkCounter, autocast, critic_values, micro_batches, old_logprob_source, token_logprobs, update_critic,
                          update_policy, used_columns)
from tppo.window import WindowHistory, choose_window, history_from_state, history_state


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class CheckpointError(OSError):
    """A checkpoint could not be written (the previous one is intact)."""


# Keys that may differ between a run and its resumption (they do not change results).
RESUMABLE_CHANGES = ("train.total_steps", "log.")


# Step metrics of a step without a policy update (critic warm-up) / of a run without a critic:
# what no update measured is undefined (NaN: null in metrics.jsonl, `-` on the console), not 0.
NAN = float("nan")
NO_POLICY_UPDATE = {"policy/loss": NAN, "policy/clipfrac": NAN, "policy/approx_kl": NAN, "policy/entropy": NAN, "policy/grad_norm": NAN,
                    "policy/skipped_steps": 0, "policy/ratio_min": 1.0, "policy/ratio_max": 1.0,
                    **BehaviorStats().metrics()}  # nothing measured: every behaviour metric undefined
NO_CRITIC = {"value/loss": NAN, "value/clipfrac": NAN, "value/grad_norm": NAN, "value/skipped_steps": 0}


# ---------------------------------------------------------------------- building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

def task_examples(cfg: Config, seed: int) -> tuple[Callable[[], Iterator[Example]], list[Example], list[str]]:
    """A run's data: a factory of the deterministic training example stream (PromptSource
    replays it), the held-out evaluation examples, and notes on where they came from."""
    if cfg.task.name in ("chain", "arith"):
        task = ChainTask(cfg.task.chain) if cfg.task.name == "chain" else ArithTask(cfg.task.arith)
        return (lambda: task.stream("train", seed)), task.distinct("heldout", seed=1234, count=cfg.task.eval_problems), []
    data = load_task_data(cfg.task)
    if not data.train:
        raise ConfigError(f"training needs training data: task.train_path is not set (task.name {cfg.task.name})")
    return (lambda: epoch_stream(data.train, seed)), data.eval, data.notes


def eval_examples(cfg: Config) -> tuple[list[Example], list[str]]:
    """The held-out examples alone (``tppo eval``): an evaluation file needs no training file."""
    if cfg.task.name == "file" and not cfg.task.train_path:
        data = load_task_data(cfg.task)
        return data.eval, data.notes
    _, examples, notes = task_examples(cfg, cfg.train.seed)
    return examples, notes


def make_optimizer(model: torch.nn.Module, lr: float, cfg: Config):
    opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=lr, betas=cfg.train.betas, weight_decay=cfg.train.weight_decay)
    warm = cfg.train.lr_warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm > 0 else 1.0)
    return opt, sched

# ---------------------------------------------------------------------- the trainer


class Trainer:
    """Owns the models, optimizers, engine, data and logs of one run."""

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False) -> None:
        """A new run in ``run_dir`` (refused where another run is, unless ``overwrite``:
        tppo/rundir.py), or with ``resume`` the run there, from its last checkpoint."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.torch_threads:
            torch.set_num_threads(cfg.train.torch_threads)
        ckpt = latest_checkpoint(self.run_dir) if resume else None
        if resume and ckpt is None:
            raise FileNotFoundError(f"--resume {self.run_dir}: no checkpoint in {self.run_dir / 'checkpoints'}")
        distributed.init_from_env(self.device, cfg.train.dist_timeout_s)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        check_trackers(cfg.log.report_to)  # a missing extra, a reward that cannot be called: refused before anything loads
        lora.check_available(cfg.model.lora)
        try:
            checked_rewards(cfg.task.reward, cfg.task.reward_batched)
        except RewardSpecError as e:
            raise ConfigError(str(e)) from None
        if not resume:
            self._claim_run_dir(overwrite)
        if cfg.train.fsdp and self.world == 1:
            raise ConfigError("train.fsdp shards the models over data-parallel ranks: launch with "
                              "`torchrun --nproc_per_node N -m tppo.cli train ...` (N >= 2), or set train.fsdp=false")
        self._seed_everything(cfg.train.seed)
        self._build_models(ckpt)
        make_stream, self.eval_set, notes = task_examples(cfg, cfg.train.seed)
        for note in [*cfg.notes, *notes] if self.rank == 0 else []:
            print(note)
        self.source = PromptSource(self._rank_share(make_stream), self.tokenizer,
                                   max_prompt_tokens=cfg.task.max_prompt_tokens, template=cfg.task.template, system=cfg.task.system,
                                   chat_template=cfg.task.chat_template)
        if self.rank == 0 and cfg.log.progress:  # what the model sees, once
            first = next(make_stream(), None)
            if first is not None:
                print(f"first training prompt, as the model sees it:\n{self.source.render(first.prompt)}")
        self.engine = self._make_engine(ckpt)
        self.scorer = RewardScorer.from_task(cfg.task)
        self.gen = torch.Generator().manual_seed(cfg.train.seed)
        self.egae_bias = TruncationTracker(cfg.algo.gamma, cfg.algo.bootstrap)
        self.window_history = WindowHistory()
        self.step_idx, self.version, self.elapsed, self.total_generated = 0, 0, 0.0, 0
        self.nonfinite_skips, self.nonfinite_in_a_row = 0, 0
        self.saved_step: int | None = None  # the step of the last checkpoint this process wrote
        self.work = WorkCounter()  # this step's positions per pass (work/*)
        self.last_window: WindowBatch | None = None  # the last step's rows and rewards (benchmarks replay them)
        self.last_rewards: list[float | None] = []
        self.reward_extras: dict[str, float] = {}  # this step's reward/<name> of a dict reward
        self._bar = None  # the console's progress bar while train() runs on a terminal
        if ckpt is not None:
            self._restore(load_trainer_state(ckpt))
        self.logger = None  # rank 0 logs
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.log.tensorboard and "tensorboard" in cfg.log.report_to,
                                        resume_step=self.step_idx if ckpt else None, trackers=make_trackers(cfg, self.run_dir, bool(ckpt)))

    # ------------------------------------------------------------------ setup

    def _claim_run_dir(self, overwrite: bool) -> None:
        """Rank 0 claims the run directory (tppo/rundir.py); every rank raises if it refused."""
        refused = None
        if self.rank == 0:
            try:
                claim(self.run_dir, overwrite=overwrite)
            except RunDirInUse as e:
                refused = e
        if distributed.max_int(int(refused is not None)):
            raise refused or RunDirInUse(f"{self.run_dir} already holds a run (rank 0 refused it)")
        distributed.barrier()  # the old run's files are gone before any rank writes

    def _make_engine(self, ckpt: Path | None):
        r = self._rank_rollout()
        if r.engine == "vllm":
            from tppo.rollout.vllm_engine import VLLMEngine

            # vLLM starts from the checkpoint's policy, or from the base (the initial policy) when the
            # checkpoint holds LoRA adapters: the first window after a resume pushes the merged weights
            own = ckpt is not None and not self.cfg.model.lora.enabled
            init = None if own else self.initial_policy()
            if init is not None and init.gguf_file:
                raise ConfigError(f"rollout.engine=vllm reads the policy's weights itself: convert the GGUF file first "
                                  f"(`tppo convert {init.repo}/{init.gguf_file} DIR`) and set model.path=DIR")
            return VLLMEngine(r, self.source, model_path=str(ckpt / "policy") if own else init.repo,
                              eos_token_ids=self.eos_ids, max_prompt_tokens=self.cfg.task.max_prompt_tokens,
                              gpu_memory_utilization=r.vllm_gpu_memory_utilization, tensor_parallel_size=r.vllm_tensor_parallel_size,
                              dtype=self.cfg.model.dtype, sleep_between_windows=r.vllm_sleep, world_size=self.world)
        return EmbeddedEngine(r, self.source, eos_token_ids=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id,
                              device=self.device)

    def _rank_rollout(self):
        """This rank's rollout config: its share of the prompts, its own sampling seed."""
        r = self.cfg.rollout
        if self.world == 1:
            return r
        if r.prompts_per_step % self.world:
            raise ConfigError(f"rollout.prompts_per_step ({r.prompts_per_step}) must be divisible by the {self.world} ranks")
        return dataclasses.replace(r, prompts_per_step=r.prompts_per_step // self.world, seed=r.seed + 1000003 * self.rank)

    def _rank_share(self, make_stream):
        """Every world-th example of the stream, from this rank's offset (disjoint shares)."""
        if self.world == 1:
            return make_stream
        return lambda: itertools.islice(make_stream(), self.rank, None, self.world)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _build_models(self, ckpt: Path | None) -> None:
        cfg, dtype = self.cfg, getattr(torch, self.cfg.model.dtype)
        init, spec = self.initial_policy(), cfg.model.lora
        self.base_source = init.resolved()  # a LoRA checkpoint names it (tppo/export.py), readable from any directory
        # a LoRA checkpoint holds adapters only: its base is the initial policy again
        self.policy, self.tokenizer = load_pretrained(ModelSource.of(ckpt / "policy") if ckpt and not spec.enabled else init, dtype=dtype)
        self.eos_ids = eos_token_ids(self.tokenizer, self.policy)
        own_aligned_memory(self.policy.to(self.device))  # bit-exact resume on CPU (see own_aligned_memory)
        self.critic = self._build_critic(ckpt, dtype) if has_critic(cfg) else None  # GRPO has none
        if self.critic is not None and self.critic.config.vocab_size != self.policy.config.vocab_size:
            raise ValueError(f"critic {cfg.model.critic_path} has a vocabulary of {self.critic.config.vocab_size} tokens but the "
                             f"policy {init.repo} has {self.policy.config.vocab_size}: the critic must read the policy's tokens "
                             f"(a checkpoint from another model?)")
        if self.critic is not None:
            own_aligned_memory(self.critic.to(self.device))
        if spec.enabled:
            self._add_adapters(ckpt)
        self.ref = None
        if cfg.algo.kl_coef and spec.enabled:  # the base under the adapters is the initial policy (B starts at 0)
            self.ref = lora.AdapterDisabled(self.policy)
        elif cfg.algo.kl_coef:  # the initial policy: loaded again on resume, a copy before the first update otherwise
            self.ref = load_pretrained(init, dtype=dtype)[0] if ckpt else copy.deepcopy(self.policy)
            own_aligned_memory(self.ref.to(self.device).eval().requires_grad_(False))
        if cfg.train.fsdp:  # before the optimizers: they hold the sharded parameters
            # a LoRA reference (AdapterDisabled) holds no parameters: it runs the sharded policy
            for model in filter(lambda m: m is not None and not isinstance(m, lora.AdapterDisabled), (self.policy, self.critic, self.ref)):
                sharding.shard(model, self.device)
        self.policy_opt, self.policy_sched = make_optimizer(self.policy, cfg.train.policy_lr, cfg)
        self.critic_opt, self.critic_sched = make_optimizer(self.critic, cfg.train.critic_lr, cfg) if self.critic is not None else (None, None)

    def _add_adapters(self, ckpt: Path | None) -> None:
        """model.lora (tppo/lora.py): adapters on the policy and, with lora.critic, on the
        critic's backbone (its head trained in full), fresh or the checkpoint's. A critic
        built from the policy reads the policy's frozen backbone, not a copy of it."""
        spec = self.cfg.model.lora
        lora_critic = self.critic is not None and spec.critic
        # sharded (train.fsdp), each model keeps its own 1/N shard of the backbone (fully_shard copies every shard)
        if lora_critic and not self.cfg.model.critic_path and not self.cfg.train.fsdp:
            lora.share_frozen_backbone(self.critic, self.policy)
        self.policy = lora.load_lora(self.policy, ckpt / "policy") if ckpt else lora.add_lora(self.policy, spec)
        if lora_critic:
            self.critic = lora.load_lora(self.critic, ckpt / "critic") if ckpt else lora.add_lora(self.critic, spec, critic=True)

    def _build_critic(self, ckpt: Path | None, dtype):
        """The critic: the checkpoint's, model.critic_path, or the policy with a value head
        (a LoRA critic's checkpoint holds its adapters and head: its base is built again)."""
        if ckpt and not (self.cfg.model.lora.enabled and self.cfg.model.lora.critic):
            return load_critic(ckpt / "critic", dtype=dtype)
        if self.cfg.model.critic_path:
            return load_critic(self.cfg.model.critic_path, dtype=dtype)
        return critic_from_policy(self.policy)

    def initial_policy(self) -> ModelSource:
        """The checkpoint RL starts from: model.path, or the SFT warm-start (built if missing)."""
        m = self.cfg.model
        if m.path:
            return ModelSource.of(m.path, m.gguf_file, m.revision)
        out = Path(self.cfg.sft.output_dir)
        if not (out / "config.json").exists() and self.rank == 0:
            from tppo.sft import run_sft

            print(f"no SFT warm-start at {out}: training one (cached for later runs)")
            run_sft(self.cfg)
        distributed.barrier()  # the other ranks wait for rank 0's SFT model
        return ModelSource.of(out)

    # ------------------------------------------------------------------ the loop

    def train(self) -> list[dict[str, Any]]:
        """Run to ``train.total_steps``; the steps' metrics. On SIGINT / SIGTERM the run stops
        at the end of the current step, saves a checkpoint and raises :class:`Interrupted`."""
        history = []
        self._bar = self._progress_bar()
        with StopRequest(announce=self.rank == 0) as stop:
            try:
                if self.step_idx == 0 and (start := self._evaluate_on_main()) is not None:
                    self.start_eval = start
                    (self.run_dir / "eval_initial.json").write_text(json.dumps(self.start_eval) + "\n")
                    self.logger.log({"step": 0, **start, "time/elapsed_s": 0.0})  # step 0: the accuracy before RL
                    se = start["eval/accuracy_se"]  # NaN with a single problem
                    self._say(f"held-out accuracy before RL: {start['eval/accuracy']:.3f}" + (f" (SE {se:.3f})" if math.isfinite(se) else ""))
                while self.step_idx < self.cfg.train.total_steps:
                    if signum := distributed.max_int(stop.signum or 0):  # every rank stops at the same step
                        self._save_for_stop(signum)
                    history.append(self.step())
            finally:
                if self._bar is not None:
                    self._bar.close()
                if self.logger is not None:
                    self.logger.close()
                self.scorer.close()
        return history

    def _progress_bar(self):
        """A live bar of the steps on a terminal (rank 0, ``log.progress``); None elsewhere,
        where every step prints its line (CI, log files)."""
        if not (self.cfg.log.progress and self.rank == 0 and sys.stdout.isatty()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.cfg.train.total_steps, initial=self.step_idx, desc="training", unit="step", dynamic_ncols=True)

    def _show_step(self, m: dict[str, Any]) -> None:
        """The step on the console: the bar's status (terminal) or its line (elsewhere); a
        step that evaluated also writes its line above the bar."""
        line = summary_line(m, self.cfg.train.total_steps, self._eta_s(m))
        if self._bar is None:
            print(line, flush=True)
            return
        self._bar.set_postfix_str(line.split(" | ", 1)[1].rsplit(" | eta", 1)[0], refresh=False)
        self._bar.update(1)
        if "eval/accuracy" in m:
            self._bar.write(line)

    def _say(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _save_for_stop(self, signum: int) -> None:
        """The stop asked by a signal: checkpoint this step boundary (unless just saved) and
        raise :class:`Interrupted`."""
        if self.saved_step != self.step_idx:
            self.save()
        raise Interrupted(self.step_idx, self.run_dir, signum)

    def step(self) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        m: dict[str, Any] = {"step": self.step_idx + 1}
        # 1-2. fill the batch and generate one window (the engine carries rows over: 8).
        W = m["rollout/window_tokens"] = self._next_window()
        with self._oom_hint("generation"):
            with sharding.gathered(self.policy):
                wb = self.engine.generate_window(self.policy, self.version, W)
        m["time/generate_s"] = time.perf_counter() - t0
        if not wb.rows:
            raise RuntimeError("the prompt stream is exhausted and no row is in flight")
        self.last_window = wb
        # 3. score finished rows.
        t = time.perf_counter()
        rewards = self._score(wb)
        self.last_rewards = rewards
        m["time/score_s"] = time.perf_counter() - t
        # 4. critic values over prompt + response so far (none for GRPO).
        t = time.perf_counter()
        packed = wb.pack(self.tokenizer.pad_token_id)
        self.work = WorkCounter()  # the positions each pass runs (work/*)
        values_full = self._values(packed, rows_with_values(cfg, packed))
        m["time/values_s"] = time.perf_counter() - t
        # 5. advantages (tppo/advantages.py: EGAE on this window, GAE, GRPO) and critic targets;
        #    the old log-probs, recomputed where the update's own forward cannot be pi_old.
        tg = compute_advantages(cfg, packed, values_full, rewards, all_reduce=distributed.sum_ if self.world > 1 else None, window_tokens=W)
        t = time.perf_counter()
        updated = self.step_idx >= cfg.train.critic_warmup_steps  # the critic-only warm-up needs no old log-probs
        recompute = updated and old_logprob_source(cfg, self.device) == "recompute"
        old_logprobs = self._old_logprobs(packed, tg.policy_mask, tg.lm_mask) if recompute else packed.old_logprobs[:, 1:]
        m["time/old_logprobs_s"] = time.perf_counter() - t
        batch = StepBatch(packed.input_ids, packed.attention_mask, tg.policy_mask, tg.critic_mask, tg.lm_mask, old_logprobs,
                          values_full[:, :-1], tg.advantages, tg.returns, packed.response_mask[:, 1:],
                          behavior_logprobs=packed.old_logprobs[:, 1:], stale=packed.versions[:, 1:] < self.version).to(self.device)
        m["train/filtered_groups"] = distributed.sum_int(tg.filtered_groups)
        #    the truncation-bias diagnostic: cut rows that finished now, EGAE vs GAE (tppo/egae_bias.py)
        m.update(self.egae_bias.observe(wb.rows, wb.window_start, values_full, rewards, policy_lambda(cfg, packed, W),
                                        all_reduce=distributed.sum_ if self.world > 1 else None))
        # 6. update the policy (after the critic-only warm-up).
        t = time.perf_counter()
        with self._oom_hint("the policy update"):
            m.update(update_policy(self.policy, self.policy_opt, self.policy_sched, batch, cfg, self.gen, self.device, self.ref,
                                   self.work) if updated else NO_POLICY_UPDATE)
        m["time/policy_update_s"] = time.perf_counter() - t
        # 7. update the critic on its tokens.
        t = time.perf_counter()
        with self._oom_hint("the critic update"):
            m.update(update_critic(self.critic, self.critic_opt, self.critic_sched, batch, cfg, self.gen, self.device, self.work)
                     if self.critic is not None else NO_CRITIC)
        m["time/value_update_s"] = time.perf_counter() - t
        # 8. carry over: the engine holds the unfinished rows for the next window.
        self.version += updated
        self.step_idx += 1
        # 9. log, evaluate, checkpoint.
        m.update(self._step_metrics(wb, rewards, batch, updated))
        m["time/step_s"] = time.perf_counter() - t0
        self._record_for_window(wb, packed, m)
        self.elapsed += m["time/step_s"]
        m["time/elapsed_s"] = self.elapsed
        if self._due(cfg.log.samples_every) and self.rank == 0:
            self._log_samples(self._train_samples(wb, rewards))
        if self._due(cfg.log.eval_every) or self.step_idx == cfg.train.total_steps:
            m.update(self._evaluate_on_main() or {})
        m["train/nonfinite_skips"] = self._count_nonfinite(m["policy/skipped_steps"] + m["value/skipped_steps"])
        m["train/policy_lr"] = self.policy_sched.get_last_lr()[0]  # the rate the next optimizer step uses
        m["train/critic_lr"] = self.critic_sched.get_last_lr()[0] if self.critic_sched is not None else float("nan")
        if self.logger is not None:
            self.logger.log(m)
        if cfg.log.progress and self.rank == 0:
            self._show_step(m)
        if self.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"step {self.step_idx}: {self.nonfinite_in_a_row} steps in a row had a NaN/inf loss or gradient "
                f"(train.max_nonfinite_steps = {cfg.train.max_nonfinite_steps}); their updates were skipped, so the "
                f"weights are those of the last finite update. Lower the learning rates or check the rewards and data.")
        if self._due(cfg.log.checkpoint_every) or self.step_idx == cfg.train.total_steps:
            self.save()
        return m

    def _eta_s(self, m: dict[str, Any]) -> float | None:
        """Seconds left at the mean step time of this run (evaluations excluded)."""
        return (self.cfg.train.total_steps - self.step_idx) * self.elapsed / self.step_idx if self.step_idx else None

    def _next_window(self) -> int:
        """This step's W: the config's, or with ``auto`` the choice of tppo/window.py."""
        r = self.cfg.rollout
        if r.window_tokens != "auto":
            return r.window_tokens
        W = choose_window(self.window_history, window_min=r.window_min, window_max=r.max_window, bias_cap=r.window_bias_cap,
                          slots=r.num_slots // self.world, group=r.samples_per_prompt)
        return distributed.max_int(W)  # ranks measure their own rows: they agree on the largest choice

    def _record_for_window(self, wb: WindowBatch, packed, m: dict[str, Any]) -> None:
        """Feed the step's measurements to the window choice (kept whatever W is: cheap)."""
        fin = [r for r in wb.rows if r.finished]
        self.window_history.record(
            lengths=[len(r.response_ids) for r in fin], prompt_lengths=[len(r.prompt_ids) for r in fin],
            decode_s=wb.stats.decode_s, decode_steps=wb.stats.decode_steps, other_s=m["time/step_s"] - wb.stats.decode_s,
            context_tokens=int(packed.attention_mask.sum()), egae_mae=m["egae/advantage_mae"], rows_compared=m["egae/rows_compared"])

    def _count_nonfinite(self, skipped: int) -> int:
        """Count optimizer steps skipped for a non-finite gradient; the total so far."""
        self.nonfinite_skips += skipped
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if skipped else 0
        return self.nonfinite_skips

    @contextlib.contextmanager
    def _oom_hint(self, phase: str):
        """Turn a GPU out-of-memory error into one that says which knob to turn."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            raise RuntimeError(
                f"out of GPU memory during {phase} (train.micro_batch_rows = {self.cfg.train.micro_batch_rows}, "
                f"{self.cfg.rollout.num_slots} generation slots): lower train.micro_batch_rows, or "
                f"rollout.prompts_per_step / rollout.max_response_tokens") from e

    def _due(self, every: int) -> bool:
        return every > 0 and self.step_idx % every == 0

    # ------------------------------------------------------------------ step helpers

    def _score(self, wb: WindowBatch) -> list[float | None]:
        done = [i for i, r in enumerate(wb.rows) if r.finished]
        texts = [decode_response(self.tokenizer, wb.rows[i].response_ids) for i in done]
        prompts = [self.tokenizer.decode(wb.rows[i].prompt_ids) for i in done]
        columns = [{k: v for k, v in wb.rows[i].meta.items() if k != "answer"} for i in done]  # the example's other dataset columns
        scores = self.scorer.score(prompts, texts, [wb.rows[i].meta["answer"] for i in done], columns) if done else []
        extras = self.scorer.last_extras if done else []
        self.reward_extras = {f"reward/{k}": _mean(e[k] for e in extras if k in e) for k in sorted({k for e in extras for k in e})}
        rewards: list[float | None] = [None] * len(wb.rows)
        for i, s in zip(done, scores):
            rewards[i] = s
        return rewards

    def _values(self, packed, rows: list[int] | None = None) -> torch.Tensor:
        """(B, S) critic values of the states of ``rows`` (step 4; default every row); zeros
        elsewhere and without a critic (GRPO)."""
        if self.critic is None:
            return torch.zeros(packed.input_ids.shape)
        rows = list(range(packed.input_ids.shape[0])) if rows is None else rows
        def values(model, ids, attn, micro):
            self.work.forward("work/value_positions", attn)
            return critic_values(model, ids, attn)

        return self._forward_rows(self.critic, packed, values, rows)

    def _old_logprobs(self, packed, policy_mask: torch.Tensor, lm_mask: torch.Tensor) -> torch.Tensor:
        """(B, S - 1) log-probs of the policy tokens under the current policy, computed with
        the update's own forward and numerics (shifted frame; updates.old_logprob_source):
        with ``algo.prefix_grad: false`` the same prefix / span split as the update's."""
        T, policy_mask = self.cfg.rollout.temperature, policy_mask.to(self.device)
        response, lm = packed.response_mask[:, 1:].to(self.device), lm_mask.to(self.device)
        width = 0 if self.cfg.algo.prefix_grad else prefix_width(response, policy_mask, lm)  # the update's (updates.update_policy)

        def logprobs(model, ids, attn, micro):
            w = policy_mask[micro, : ids.shape[1] - 1]
            if self.cfg.algo.prefix_grad:
                self.work.forward("work/old_logprob_positions", attn)
                return token_logprobs(model, ids, attn, T, columns=used_columns(w))[0]
            starts = span_starts(response[micro, : ids.shape[1] - 1], w, lm[micro, : ids.shape[1] - 1])
            self.work.forward("work/old_logprob_positions", attn, starts, width)
            return span_logprobs(model, ids, attn, starts, T, columns=w, prefix_width=width)[0]

        rows = policy_mask.any(1).nonzero().flatten().tolist()
        return self._forward_rows(self.policy, packed, logprobs, rows)[:, :-1]

    @torch.no_grad()
    def _forward_rows(self, model, packed, fn, rows: list[int]) -> torch.Tensor:
        """(B, S) on the CPU: ``fn(model, ids, attn, micro)`` ((b, s') with s' <= s) over
        ``rows``, micro-batched, in eval mode and the trainer's autocast; zeros past each
        output and in the other rows."""
        model.eval()
        out = torch.zeros(packed.input_ids.shape)
        with sharding.gathered(model):  # ranks have different row counts: no collectives inside
            for micro in micro_batches(packed, rows, self.cfg.train):  # packed by token budget as the updates are
                S = int(packed.attention_mask[micro].sum(1).max())
                with autocast(self.cfg, self.device):
                    v = fn(model, packed.input_ids[micro, :S].to(self.device), packed.attention_mask[micro, :S].to(self.device), micro)
                out[micro, : v.shape[1]] = v.float().cpu()
        return out

    def _step_metrics(self, wb: WindowBatch, rewards, batch: StepBatch, updated: bool) -> dict[str, Any]:
        fin = [r for r in wb.rows if r.finished]
        scored = [x for x in rewards if x is not None]
        lengths = [len(r.response_ids) for r in fin]
        cm = batch.critic_mask
        m = {
            "rollout/slot_utilization": wb.stats.slot_utilization,
            "rollout/decode_steps": wb.stats.decode_steps,
            "work/decode_steps": wb.stats.decode_steps,
            "work/row_steps": wb.stats.row_steps,
            "work/kv_positions": wb.stats.kv_positions,
            "work/cache_positions": wb.stats.cache_positions,
            "work/prefill_tokens": wb.stats.prefill_tokens,
            "work/prefill_positions": wb.stats.prefill_positions,
            "work/prefill_calls": wb.stats.prefill_calls,
            "work/copy_positions": wb.stats.copy_positions,
            **self.work.counts,
            "rollout/tokens_per_s": wb.stats.tokens_per_s,
            "time/prefill_s": wb.stats.prefill_s,
            "time/decode_s": wb.stats.decode_s,
            "rollout/generated_tokens": wb.stats.generated_tokens,
            "rollout/finished_rows": len(fin),
            "rollout/carried_rows": len(self.engine.carried),
            "rollout/windows_per_response": _mean([r.windows for r in fin]),
            "rollout/windows_per_response_max": max([r.windows for r in fin], default=0),
            "rollout/versions_per_response": _mean([len(set(r.versions)) for r in fin]),
            "rollout/response_length": _mean(lengths),
            "rollout/response_length_max": max(lengths, default=0),
            "rollout/truncated_at_cap": sum(r.finish_reason == "length" for r in fin),
            "rollout/prompts_consumed": self.source.cursor,
            "data/skipped_long_prompts": self.source.skipped_long,
            "data/skipped_empty_prompts": self.source.skipped_empty,
            "reward/mean": _mean(scored),
            "reward/accuracy": _mean([float(x >= 1.0) for x in scored]),
            "reward/errors": self.scorer.errors + self.scorer.timeouts,
            "reward/timeouts": self.scorer.timeouts,
            "policy/tokens": int(batch.policy_mask.sum()),
            "rollout/stale_token_frac": float((batch.stale & batch.policy_mask).sum()) / max(1, int(batch.policy_mask.sum())),
            "policy/updated": int(updated),
            "value/tokens": int(cm.sum()),
            "value/explained_variance": float(algos.explained_variance(batch.old_values, batch.returns, cm)) if cm.any() else float("nan"),
        }
        m.update(self.reward_extras)  # a dict reward's named values, mean over the finished rows
        r = self.cfg.rollout  # a row refilled mid-window spans one window more than L / W
        m.update(round_metrics(wb.rows, rewards, r.max_windows + r.refill_within_window))
        m.update(carry_metrics(wb.rows, wb.window_start, self.engine.carried))
        if self.world > 1:
            self._sum_over_ranks(m, scored)
        self.total_generated += m["rollout/generated_tokens"]
        m["rollout/total_generated_tokens"] = self.total_generated
        return m

    def _sum_over_ranks(self, m: dict[str, Any], scored: list[float]) -> None:
        """Counts and reward statistics of the whole data-parallel batch (the other
        metrics stay rank 0's: utilization, lengths, losses, timings)."""
        counts = ("rollout/generated_tokens", "rollout/finished_rows", "rollout/carried_rows", "policy/tokens", "value/tokens",
                  *(k for k in m if k.startswith("work/") and k != "work/decode_steps"))  # work done by all ranks
        local = [float(m[k]) for k in counts] + [sum(scored), float(len(scored)), float(sum(x >= 1.0 for x in scored))]
        total = distributed.sum_(torch.tensor(local, dtype=torch.float64)).tolist()
        m.update({k: int(v) for k, v in zip(counts, total)})
        n = total[-2]
        m["reward/mean"] = total[-3] / n if n else float("nan")
        m["reward/accuracy"] = total[-1] / n if n else float("nan")

    def _evaluate_on_main(self) -> dict[str, float] | None:
        """Rank 0 evaluates and logs its samples (None elsewhere); all ranks call it (a
        sharded policy is gathered for it)."""
        with sharding.gathered(self.policy):
            if self.rank != 0:
                return None
            metrics, samples = self._evaluate_with_samples()
        self._log_samples(samples)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Held-out avg@k (``eval/accuracy``) and pass@k of the current policy."""
        return self._evaluate_with_samples()[0]

    def _evaluate_with_samples(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        k, n = self.cfg.log.eval_samples, self.cfg.log.samples
        generate = run_generate_fn(self.cfg, self.policy, self.tokenizer, self.eos_ids, self.device)
        res = evaluate(self.eval_set, generate, self.scorer, samples=k, ks=(1, k))
        samples = [{"split": "eval", "prompt": prompt_text(e.prompt), "completion": c[0], "reward": r[0], "finished": True, "windows": None}
                   for e, c, r in zip(self.eval_set[:n], res.completions, res.rewards)]
        # pass@k under one key whatever k is (eval/k says which); pass@{k} kept for earlier readers
        return {"eval/accuracy": res.avg_at_k, "eval/accuracy_se": avg_at_k_se(res.correct), "eval/pass@k": res.pass_at_k[k],
                "eval/k": k, f"eval/pass@{k}": res.pass_at_k[k]}, samples

    def _train_samples(self, wb: WindowBatch, rewards: list[float | None]) -> list[dict[str, Any]]:
        """The first ``log.samples`` rows of the window: the response so far, its reward
        (None while unfinished) and the windows it has spanned."""
        return [{"split": "train", "prompt": self.tokenizer.decode(r.prompt_ids, skip_special_tokens=True),
                 "completion": decode_response(self.tokenizer, r.response_ids), "reward": x, "finished": r.finished, "windows": r.windows}
                for r, x in list(zip(wb.rows, rewards))[: self.cfg.log.samples]]

    def _log_samples(self, samples: list[dict[str, Any]]) -> None:
        """To samples.jsonl and TensorBoard (rank 0), one on the console."""
        if not samples or self.logger is None:
            return
        self.logger.log_samples(self.step_idx, samples)
        if self.cfg.log.progress:
            self._say(sample_line(samples[0]))

    # ------------------------------------------------------------------ checkpoints

    def save(self) -> Path | None:
        """Rank 0 writes one checkpoint holding the (identical) models and optimizers and
        every rank's own state: its rows in flight, prompt cursor, scorer counts, RNGs."""
        critic = self.critic is not None  # GRPO has none
        policy_state = sharding.full_model_state(self.policy)
        critic_state = sharding.full_model_state(self.critic) if critic else None
        policy_opt = sharding.full_optimizer_state(self.policy, self.policy_opt)
        critic_opt = sharding.full_optimizer_state(self.critic, self.critic_opt) if critic else None

        def write_models(d: Path) -> None:
            save_pretrained(self.policy, self.tokenizer, d / "policy", state_dict=policy_state)
            if self.cfg.model.lora.enabled:  # the adapters' base, wherever the checkpoint is read from (tppo/export.py)
                (d / "policy" / BASE_FILE).write_text(json.dumps(self.base_source.to_dict()))
            if critic:
                self.critic.save_pretrained(d / "critic", state_dict=critic_state, safe_serialization=True)

        ranks = distributed.gather_to_main({
            "engine": self.engine.state_dict(), "source": self.source.state_dict(), "egae_bias": self.egae_bias.state_dict(),
            "window": history_state(self.window_history),
            "scorer": {"calls": self.scorer.calls, "errors": self.scorer.errors, "timeouts": self.scorer.timeouts},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "trainer": self.gen.get_state()},
        })
        path = None
        if self.rank == 0:
            state = {
                "step": self.step_idx, "version": self.version, "elapsed": self.elapsed, "total_generated": self.total_generated,
                "nonfinite": [self.nonfinite_skips, self.nonfinite_in_a_row],
                "policy_opt": policy_opt, "policy_sched": self.policy_sched.state_dict(),
                "critic_opt": critic_opt, "critic_sched": self.critic_sched.state_dict() if critic else None,
                "world_size": self.world, "ranks": ranks,
            }
            try:
                path = save_checkpoint(self.run_dir, self.step_idx, write_models, state, keep=self.cfg.log.keep_checkpoints)
            except OSError as e:
                prev = latest_checkpoint(self.run_dir)
                raise CheckpointError(f"checkpoint of step {self.step_idx} not written ({e}); "
                                      + (f"the previous checkpoint {prev} is intact: `tppo train --resume {self.run_dir}` restarts from it"
                                         if prev else "no earlier checkpoint exists")) from e
        distributed.barrier()
        self.saved_step = self.step_idx
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world:
            raise ConfigError(f"the checkpoint was written by {state['world_size']} ranks; resume it with the same number "
                              f"(this run has {self.world}): each rank's rows in flight and prompt cursor are its own")
        self.step_idx, self.version = state["step"], state["version"]
        self.saved_step = self.step_idx
        self.elapsed, self.total_generated = state["elapsed"], state["total_generated"]
        self.nonfinite_skips, self.nonfinite_in_a_row = state["nonfinite"]
        sharding.load_optimizer_state(self.policy, self.policy_opt, state["policy_opt"])
        self.policy_sched.load_state_dict(state["policy_sched"])
        if self.critic is not None:
            sharding.load_optimizer_state(self.critic, self.critic_opt, state["critic_opt"])
            self.critic_sched.load_state_dict(state["critic_sched"])
        mine = state["ranks"][self.rank]
        self.source.load_state_dict(mine["source"])
        self.engine.load_state_dict(mine["engine"])
        if "egae_bias" in mine:  # checkpoints before the diagnostic and the window choice: they start empty
            self.egae_bias.load_state_dict(mine["egae_bias"])
            self.window_history = history_from_state(mine["window"])
        for k, v in mine["scorer"].items():
            setattr(self.scorer, k, v)
        torch.set_rng_state(mine["rng"]["torch"])
        random.setstate(mine["rng"]["python"])
        self.gen.set_state(mine["rng"]["trainer"])


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def resume_config(run_dir: str | Path, requested: Config | None) -> Config:
    """The config of a run being resumed; refuses a different one, naming the fields."""
    saved = load_config(Path(run_dir) / "config.yaml")
    if requested is None:
        return saved
    differing = diff_configs(saved, requested, ignore=RESUMABLE_CHANGES)
    if differing:
        raise ConfigError(f"--resume {run_dir}: the run was made with a different config; differing fields: {', '.join(differing)}")
    return requested
