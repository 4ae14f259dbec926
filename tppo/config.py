"""Typed configuration: nested dataclasses, the only schema.

Each field is documented once, in its dataclass docstring. YAML files are saved
instances (:func:`load_config`, :func:`save_config`); the command line overrides any
field with a dotted key (``rollout.window_tokens=64``). Unknown keys and mistyped values
are errors that name the key; derived sizes are computed and checked in
``__post_init__`` / :meth:`Config.validate`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or inconsistent; the message names the key."""


@dataclasses.dataclass
class RolloutConfig:
    """Generation batch and sampling (T-PPO spec, steps 1-2).

    Attributes:
        prompts_per_step: new prompts admitted per step when every slot is free.
        samples_per_prompt: G, responses per prompt (a group of G slots).
        window_tokens: W, new tokens a row may generate per step. ``W == L`` is
            synchronous PPO: every row finishes inside its one window. ``auto``: chosen
            every step from what the run has measured (tppo/window.py: predicted prompts
            per second under a cap on the EGAE truncation error), logged as
            ``rollout/window_tokens``.
        window_min, window_max: bounds of ``auto`` (window_max null: L); candidates are
            the multiples of window_min up to window_max.
        window_bias_cap: ``auto`` keeps the predicted mean |A_EGAE - A_GAE| per policy
            token (the measured per-cut-token error times the share of tokens in cut
            windows, tppo/window.py) at or below this (advantages before whitening).
        max_response_tokens: L, a response's total cap; reaching it finishes the row.
        temperature: sampling temperature; log-probs are those of the
            temperature-scaled distribution (the policy the trainer optimises).
            0 means greedy.
        top_p: nucleus sampling mass (1.0 = off). Truncation changes the sampling
            distribution but not the recorded log-probs (as in verl and vLLM).
        top_k: keep the k most likely tokens (0 = off).
        remove_finished: drop rows that finish mid-window from the decode batch so no
            compute is spent on them. False decodes them as padding until the whole
            batch is done, like ``model.generate`` (the naive baseline).
        refill_within_window: admit new prompts into slots freed mid-window at once
            (continuous batching) instead of at the next window. New rows join the
            lockstep decode batch and are cut with the others at the window's end.
            Requires ``remove_finished``.
        window_mode: what a window is. ``tokens``: every row may generate up to W new
            tokens, and the window ends when the last has (a row admitted mid-window by
            refill also gets its W, so the window can run up to W decode steps longer;
            the vLLM engine's ``max_tokens`` = W per request). ``steps``: the window ends
            after its first rows' W decode steps and refilled rows are cut with the
            others (embedded engine only). The two differ only with refill.
        ignore_eos: never stop on EOS (benchmarks force lengths with per-prompt caps).
        seed: seed of the engine's sampling generator.
        engine: ``embedded`` (tppo's own, the default) or ``vllm`` (GPU; ``tppo[vllm]``).
        vllm_gpu_memory_utilization, vllm_tensor_parallel_size: passed to ``vllm.LLM``.
        vllm_sleep: put vLLM to sleep (weights offloaded, KV cache freed) while the
            trainer updates, waking it for the next window.
    """

    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    window_tokens: int | Literal["auto"] = 64
    max_response_tokens: int = 256
    window_min: int = 16
    window_max: int | None = None
    window_bias_cap: float = 0.05
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    remove_finished: bool = True
    refill_within_window: bool = False
    window_mode: Literal["tokens", "steps"] = "tokens"
    ignore_eos: bool = False
    seed: int = 0
    engine: Literal["embedded", "vllm"] = "embedded"
    vllm_gpu_memory_utilization: float = 0.4
    vllm_tensor_parallel_size: int = 1
    vllm_sleep: bool = False

    def __post_init__(self) -> None:
        for key in ("prompts_per_step", "samples_per_prompt", "max_response_tokens", "window_min"):
            if getattr(self, key) < 1:
                raise ConfigError(f"rollout.{key} must be >= 1 (got {getattr(self, key)})")
        if self.window_tokens == "auto":
            if not self.window_min <= self.max_window <= self.max_response_tokens:
                raise ConfigError(f"rollout.window_tokens=auto needs window_min <= window_max <= max_response_tokens "
                                  f"(got {self.window_min}, {self.window_max}, {self.max_response_tokens})")
        elif self.window_tokens < 1:
            raise ConfigError(f"rollout.window_tokens must be >= 1 or auto (got {self.window_tokens})")
        elif self.window_tokens > self.max_response_tokens:
            raise ConfigError(
                f"rollout.window_tokens ({self.window_tokens}) exceeds rollout.max_response_tokens "
                f"({self.max_response_tokens}); use window_tokens == max_response_tokens for synchronous PPO"
            )
        if self.refill_within_window and not self.remove_finished:
            raise ConfigError("rollout.refill_within_window needs rollout.remove_finished (freed slots are what it refills)")
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise ConfigError(f"rollout.top_k must be >= 0 (got {self.top_k})")

    @property
    def num_slots(self) -> int:
        """Size of the generation batch: prompts_per_step x samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def max_windows(self) -> int:
        """The most windows a response can span: ceil(L / W) (W: the smallest window)."""
        return -(-self.max_response_tokens // self.min_window)

    @property
    def min_window(self) -> int:
        """The smallest W this run can use (window_min when W is auto)."""
        return self.window_min if self.window_tokens == "auto" else self.window_tokens

    @property
    def max_window(self) -> int:
        """The largest W this run can use (window_max, else L, when W is auto)."""
        if self.window_tokens != "auto":
            return self.window_tokens
        return self.max_response_tokens if self.window_max is None else self.window_max


@dataclasses.dataclass
class TinyModelConfig:
    """Sizes of the embedded tiny Llama (defaults: ~1.06M parameters).

    Attributes:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads: as in transformers'
            ``LlamaConfig``.
        max_position_embeddings, tie_word_embeddings: as in transformers' ``LlamaConfig``.
    """

    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True


@dataclasses.dataclass
class ChainConfig:
    """The embedded chain-subtraction task (``tppo.tasks.chain``).

    Attributes:
        median_steps: median number of subtraction steps k.
        sigma: log-normal shape of k (0: every problem has ``median_steps`` steps).
        min_steps, max_steps: clip range of k.
        min_divisor, max_divisor: range of the digit d.
        min_end: smallest answer ``n - d*k`` (every value of a chain is >= it; 100 keeps
            them three digits, a fixed 4 tokens per step).
        max_start: largest start ``n``.
        heldout_fraction: share of the problem space reserved for evaluation.
    """

    median_steps: float = 6.0
    sigma: float = 0.9
    min_steps: int = 1
    max_steps: int = 60
    min_divisor: int = 2
    max_divisor: int = 9
    min_end: int = 100
    max_start: int = 999
    heldout_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ConfigError(f"task.chain: need 1 <= min_steps <= max_steps (got {self.min_steps}, {self.max_steps})")
        if not 2 <= self.min_divisor <= self.max_divisor <= 9:
            raise ConfigError(f"task.chain: need 2 <= min_divisor <= max_divisor <= 9 (got {self.min_divisor}, {self.max_divisor})")
        if not 0 <= self.min_end <= self.max_start - self.max_steps * self.max_divisor:
            raise ConfigError(f"task.chain: need 0 <= min_end <= max_start - max_steps * max_divisor so every length has "
                              f"problems (got min_end={self.min_end}, max_start={self.max_start}, "
                              f"max_steps * max_divisor = {self.max_steps * self.max_divisor})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"task.chain.heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")


@dataclasses.dataclass
class ArithConfig:
    """The arithmetic word-problem task for pretrained models (``tppo.tasks.arithmetic``).

    Attributes:
        ops: operations, drawn uniformly: ``add``, ``sub``, ``mul``.
        min_operand, max_operand: range of both operands.
        heldout_fraction: share of the problem space reserved for evaluation.
    """

    ops: list[Literal["add", "sub", "mul"]] = dataclasses.field(default_factory=lambda: ["add"])
    min_operand: int = 2
    max_operand: int = 9
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not self.ops:
            raise ConfigError("task.arith.ops must name at least one operation (add, sub, mul)")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ConfigError(f"task.arith: need 0 <= min_operand <= max_operand (got {self.min_operand}, {self.max_operand})")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"task.arith.heldout_fraction must be in (0, 1) (got {self.heldout_fraction})")


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters through ``peft`` (needs ``tppo[peft]``) instead of a full fine-tune.

    Attributes:
        r: the adapters' rank (0: off, every weight trains).
        alpha: the adapters' scale numerator (the weight update is alpha / r x B A).
        dropout: dropout on the adapters' input. Keep 0: PPO's ratio and the critic's
            targets need a deterministic forward (see ``models.disable_dropout``).
        target_modules: module names that get adapters, or ``all-linear`` (peft's: every
            linear layer but the output projection).
        critic: the critic's backbone gets adapters too and its value head trains in full
            (false: a full critic beside the LoRA policy).
    """

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    critic: bool = True

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ConfigError(f"model.lora.r must be >= 0 (0: no LoRA), got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name modules (q_proj, v_proj, ...) or use all-linear")
        if self.alpha <= 0:
            raise ConfigError(f"model.lora.alpha must be > 0 (the update is alpha / r x B A), got {self.alpha}")
        embeddings = sorted({"embed_tokens", "lm_head", "wte", "embed_in", "embed_out"} & set(
            m.rsplit(".", 1)[-1] for m in (self.target_modules if isinstance(self.target_modules, list) else [])))
        if embeddings:
            raise ConfigError(f"model.lora.target_modules: {embeddings[0]} is an embedding or the LM head; tppo's merged "
                              f"weights (vLLM, export) cover linear layers only")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@dataclasses.dataclass
class ModelConfig:
    """Policy and critic models.

    Attributes:
        path: the policy's checkpoint: a local Hugging Face directory, a hub id
            (``Qwen/Qwen2.5-0.5B-Instruct``: downloaded as transformers does, or read from
            the cache; ``HF_HUB_OFFLINE=1`` never downloads) or a ``.gguf`` file. None:
            the embedded tiny model, warm-started by SFT (``sft.output_dir``).
        revision: hub revision of ``path`` (branch, tag or commit; None: main).
        critic_path: checkpoint of the critic (a token-classification model with one
            label), a local directory or hub id. None: the policy's weights with a fresh
            scalar head.
        gguf_file: file name inside ``path`` when the checkpoint is a GGUF file (needs
            ``tppo[gguf]``). It is dequantised once at load into a plain model, so
            checkpoints are ordinary safetensors directories (see ``tppo convert``).
        dtype: parameter dtype: float32 or bfloat16 (bf16 autocast is used on GPUs
            whatever this is; see ``train.bf16``).
        tiny: sizes of the embedded tiny Llama (ignored with ``path``).
        lora: LoRA adapters for the policy (and the critic's backbone); ``r: 0`` is a
            full fine-tune. With LoRA the KL reference is the policy with its adapter
            disabled (no second copy), checkpoints hold the adapters, and ``tppo export``
            writes merged weights.
    """

    path: str | None = None
    revision: str | None = None
    critic_path: str | None = None
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    tiny: TinyModelConfig = dataclasses.field(default_factory=TinyModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class TaskConfig:
    """Prompts, answers and the reward.

    Attributes:
        name: ``chain`` (the embedded task), ``arith`` (arithmetic word problems for
            pretrained chat models, answered in ``\\boxed{}``), ``file`` (local JSONL/Parquet files:
            ``train_path``, ``eval_path``) or ``hf`` (a Hugging Face dataset: ``dataset``,
            ``dataset_config``, ``train_split``, ``eval_split``; needs ``tppo[hf]``).
        reward: the reward: a registered name (``exact`` for chain, ``math``), a
            ``package.module:function`` or a ``path/to/file.py:function`` called as
            ``fn(prompt, completion, answer, **columns)`` (tppo/rewards.py), or a list of
            them, whose weighted sum is the reward (each logged as ``reward/<name>``).
        reward_weights: one weight per reward of the list (null: 1 each).
        reward_batched: the rewards take lists (``fn(prompts, completions, answers,
            **columns) -> list``), one call per batch (a function's ``batched = True``
            attribute says the same for it alone).
        reward_timeout_s: per-answer scoring limit; past it the reward is 0 (counted).
        reward_workers: scoring processes (0: inline).
        format_penalty: subtracted when a completion has no final answer (0: off).
        chain: the embedded task's parameters (its length distribution above all).
        arith: the arithmetic task's parameters.
        train_path, eval_path: dataset files for ``name: file``.
        dataset, dataset_config, train_split, eval_split: for ``name: hf``, the
            arguments of ``datasets.load_dataset`` (a hub name like ``openai/gsm8k`` or a
            local dataset directory; its config, e.g. ``main``; the splits).
            Without an evaluation set (``eval_path`` / ``eval_split`` null),
            ``eval_problems`` training rows are held out: removed from the training
            stream and used for evaluation (the log says so).
        prompt_field, answer_field, answer_format: dataset columns and answer format
            (gsm8k, boxed, integer, raw). The prompt column may hold a string or a
            conversation (a list of ``{role, content}`` messages, TRL's conversational
            format), rendered with the tokenizer's chat template.
        skip_bad_rows: skip malformed dataset rows (counted) instead of failing.
        template: prompt template; ``{prompt}`` is replaced by the question and every
            other brace is kept as it is (``\\boxed{}``, JSON, LaTeX).
        system: optional system message for chat templates.
        chat_template: apply the tokenizer's chat template to a string prompt (false: the
            templated text goes to the model as it is, for a base model; a conversation
            always needs the chat template).
        max_prompt_tokens: longer prompts are skipped and counted.
        eval_problems: held-out problems per evaluation.
    """

    name: Literal["chain", "arith", "file", "hf"] = "chain"
    reward: str | list[str] = "exact"
    reward_weights: list[float] | None = None
    reward_batched: bool = False
    reward_timeout_s: float = 10.0
    reward_workers: int = 0
    format_penalty: float = 0.0
    chain: ChainConfig = dataclasses.field(default_factory=ChainConfig)
    arith: ArithConfig = dataclasses.field(default_factory=ArithConfig)
    train_path: str | None = None
    eval_path: str | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    train_split: str = "train"
    eval_split: str | None = None
    prompt_field: str = "question"
    answer_field: str = "answer"
    answer_format: Literal["gsm8k", "boxed", "integer", "raw"] = "gsm8k"
    skip_bad_rows: bool = False
    template: str = "{prompt}"
    system: str | None = None
    chat_template: bool = True
    max_prompt_tokens: int = 1024
    eval_problems: int = 128

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise ConfigError(f"task.template must contain '{{prompt}}' (got {self.template!r})")
        if self.name == "file" and not (self.train_path or self.eval_path):
            raise ConfigError("task.name 'file' needs task.train_path (training) or task.eval_path (evaluation only)")
        if self.name == "hf" and not self.dataset:
            raise ConfigError("task.name 'hf' needs task.dataset (a Hugging Face dataset name like openai/gsm8k, or a local dataset directory)")
        n = 1 if isinstance(self.reward, str) else len(self.reward)
        if n == 0:
            raise ConfigError("task.reward is an empty list: name at least one reward")
        if self.reward_weights is not None and len(self.reward_weights) != n:
            raise ConfigError(f"task.reward_weights has {len(self.reward_weights)} weights for {n} rewards (task.reward)")


@dataclasses.dataclass
class AlgoConfig:
    """The RL algorithm and its losses (T-PPO spec, "EGAE" and "Losses").

    Attributes:
        algorithm: ``tppo`` (windowed, EGAE, critic on finished rows), ``ppo``
            (synchronous) or ``grpo`` (critic-free, group-relative advantages,
            synchronous; no critic is built, no value pass or value update runs). The
            synchronous algorithms generate whole responses: rollout.window_tokens is set
            to max_response_tokens (and the run says so), so one config serves all three.
        train_on: ``window`` (T-PPO: the policy trains on every window's tokens, EGAE) or
            ``finished`` (partial-rollout PPO: the same windowed rollout with carry-over,
            but a response is trained on once, in the step it finishes, over all its
            tokens with GAE; tokens of older policy versions are corrected by
            ``behavior_correction``). Needs the old log-probs from the trainer
            (old_logprobs auto or recompute).
        grpo_std: GRPO divides by the group's reward std (false: Dr. GRPO's unscaled form).
        filter_groups: GRPO only: groups whose rewards are all equal get no policy loss
            (DAPO's dynamic sampling; counted in ``train/filtered_groups``).
        gamma: discount (1 in the paper).
        lam_policy: GAE lambda of the policy's advantages; ``adaptive`` is VAPO's
            length-adaptive lambda (lam_alpha, lam_min).
        lam_alpha, lam_min: alpha and floor of the adaptive lambda.
        bootstrap: EGAE's value after a window cut: prev_value (paper), next_value, zero.
        critic_on: ``finished`` (T-PPO: Monte-Carlo targets of finished rows) or
            ``all`` (ablation: also unfinished rows' window tokens, bootstrapped targets).
        whiten_advantages: whiten advantages over the step's policy tokens.
        clip_low, clip_high, dual_clip: PPO ratio clipping (clip-higher, dual clip;
            dual_clip null disables it).
        value_clip_low, value_clip_high: value clipping around the pre-update values
            (null disables it).
        loss_agg: token-mean, seq-mean-token-mean or seq-mean-token-sum.
        entropy_coef: entropy bonus weight (0: off).
        kl_coef, kl_kind: KL penalty to the initial policy (0: off; k1, k2, k3).
        lm_loss_coef: VAPO's positive-example LM loss weight on finished correct
            responses (0: off; 0.1 in the authors' port).
        window_ignore_tokens: zero the advantage of the last k tokens of an unfinished
            row's window (8 in the authors' port).
        old_logprobs: where PPO's old log-probs pi_old come from. With one update per step
            (train.ppo_epochs x train.mini_batches == 1) pi_old is the update's own forward,
            detached, under ``auto`` and ``recompute``: the ratio is 1 and the gradient
            the recompute's, and no separate pass runs. Otherwise ``recompute`` (the
            trainer's own forward before the update, same numerics), ``engine`` (the
            sampling log-probs mu), or ``auto``: recompute under bf16 autocast, bf16
            weights, the vLLM engine, train_on=finished or a behaviour correction, the
            engine's otherwise (the fp32 embedded path, where both agree to ~1e-6).
        behavior_correction: correct the policy loss for tokens sampled by mu != pi_old
            (engine numerics, older policy versions): ``none``, ``tis`` (weight
            min(pi_old / mu, behavior_clip), detached) or ``icepop`` (drop tokens whose
            pi_old / mu leaves icepop_range). Needs old_logprobs auto or recompute.
        behavior_clip: TIS's cap on the behaviour ratio.
        icepop_range: [low, high] of the behaviour ratio IcePop keeps.
        prefix_grad: back-propagate the policy loss through a carried row's earlier
            windows (true: the exact update). false: those windows (and the prompt
            before them) run forward without gradient and only the row's tokens from
            its first loss token on are back-propagated: truncated backpropagation
            through the context, cheaper, an approximation (tppo/prefix.py).
    """

    algorithm: Literal["tppo", "ppo", "grpo"] = "tppo"
    train_on: Literal["window", "finished"] = "window"
    grpo_std: bool = True
    filter_groups: bool = False
    gamma: float = 1.0
    lam_policy: float | Literal["adaptive"] = "adaptive"
    lam_alpha: float = 0.05
    lam_min: float = 0.95
    bootstrap: Literal["prev_value", "next_value", "zero"] = "prev_value"
    critic_on: Literal["finished", "all"] = "finished"
    whiten_advantages: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 10.0
    value_clip_low: float | None = 0.5
    value_clip_high: float | None = 0.6
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    lm_loss_coef: float = 0.0
    window_ignore_tokens: int = 0
    old_logprobs: Literal["auto", "recompute", "engine"] = "auto"
    behavior_correction: Literal["none", "tis", "icepop"] = "none"
    behavior_clip: float = 2.0
    icepop_range: tuple[float, float] = (0.5, 2.0)
    prefix_grad: bool = True

    def __post_init__(self) -> None:
        if self.filter_groups and self.algorithm != "grpo":
            raise ConfigError("algo.filter_groups drops prompt groups with equal rewards: it needs algo.algorithm=grpo")
        if self.old_logprobs == "engine" and (self.train_on == "finished" or self.behavior_correction != "none"):
            raise ConfigError("algo.train_on=finished and algo.behavior_correction compare the trainer's pi_old with the "
                              "engine's mu: set algo.old_logprobs to auto or recompute, not engine")
        if not 0 < self.icepop_range[0] <= 1 <= self.icepop_range[1]:
            raise ConfigError(f"algo.icepop_range must hold 1 (low <= 1 <= high, low > 0), got {list(self.icepop_range)}")
        if self.behavior_clip < 1:
            raise ConfigError(f"algo.behavior_clip must be >= 1 (got {self.behavior_clip})")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation and the run.

    Attributes:
        total_steps: RL steps (one window each for T-PPO, one full batch for PPO).
        seed: seed of everything but the engine's sampler (see rollout.seed).
        policy_lr, critic_lr: AdamW learning rates.
        weight_decay: AdamW weight decay (both models).
        betas: AdamW betas.
        lr_warmup_steps: linear learning-rate warm-up, in optimizer steps.
        grad_clip: max global gradient norm (0: off).
        critic_warmup_steps: first steps train only the critic.
        ppo_epochs: passes over each step's data.
        mini_batches: optimizer steps per epoch (the step's rows split evenly).
        micro_batch_rows: rows per forward/backward (gradient accumulation).
        micro_batch_tokens: if > 0, micro-batches are packed by length instead: rows
            sorted longest first, each micro-batch holding rows x its longest row <= this
            many tokens (and at most micro_batch_rows rows), so short rows are not padded
            to a long one's length (tppo/batching.py). The gradient is the same.
        device: cpu, cuda, or auto.
        bf16: autocast in bfloat16 on CUDA (ignored on CPU).
        torch_threads: CPU threads for torch (0: torch's default).
        max_nonfinite_steps: stop after this many steps in a row whose loss or gradient
            was NaN/inf (each such optimizer step is skipped, weights unchanged).
        dist_timeout_s: data-parallel runs: the longest a collective waits for the other
            ranks; a rank that died makes the others fail after this long, not hang.
        fsdp: data-parallel runs: shard the policy, critic and reference with FSDP2
            (``fully_shard``, one unit per decoder layer) instead of holding a full
            replica per rank; see tppo/sharding.py.
    """

    total_steps: int = 100
    seed: int = 0
    policy_lr: float = 1e-4
    critic_lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    lr_warmup_steps: int = 0
    grad_clip: float = 1.0
    critic_warmup_steps: int = 0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_rows: int = 32
    micro_batch_tokens: int = 0
    device: str = "auto"
    bf16: bool = True
    torch_threads: int = 0
    max_nonfinite_steps: int = 5
    dist_timeout_s: float = 600.0
    fsdp: bool = False

    def __post_init__(self) -> None:
        for key in ("total_steps", "ppo_epochs", "mini_batches", "micro_batch_rows", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1 (got {getattr(self, key)})")


@dataclasses.dataclass
class LogConfig:
    """Logging, evaluation and checkpoints.

    Attributes:
        run_dir: run directory (metrics.jsonl, config.yaml, checkpoints, plots).
        tensorboard: also write TensorBoard event files (false drops ``tensorboard`` from
            report_to).
        report_to: the trackers beside metrics.jsonl: ``tensorboard``, ``wandb``
            (``tppo[wandb]``), ``mlflow`` (``tppo[mlflow]``); tppo/trackers.py.
        project: the W&B project / MLflow experiment.
        run_name: the tracker run's name (null: the run directory's name).
        mlflow_tracking_uri: MLflow's tracking URI (null: a file store in
            RUN_DIR/trackers/mlruns, no server needed).
        progress: show a progress bar and one summary line per step.
        eval_every: evaluate held-out accuracy every N steps (0: only at the start and end).
        eval_samples: samples per held-out problem (avg@k and pass@k).
        eval_batch_rows: rows an evaluation decodes at once (problems x eval_samples;
            null: rollout.prompts_per_step x rollout.samples_per_prompt, the training
            batch, which already fits). The evaluation is synchronous, so each batch waits
            for its longest response: more rows wait for fewer tails (the speed study's
            1024 problems: 1024 rows 3.5x faster than 16 on the CPU, results/eval_batch.json).
        checkpoint_every: save a checkpoint every N steps (0: only at the end).
        keep_checkpoints: keep the last K checkpoints.
        samples: prompts whose completions are logged at each evaluation (the first
            sample of the first problems) and every samples_every steps (the first rows
            of the window, finished or not) to RUN_DIR/samples.jsonl and TensorBoard;
            the console shows one (0: off).
        samples_every: log training samples every N steps (0: only at evaluations).
    """

    run_dir: str = "runs/demo"
    tensorboard: bool = True
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = dataclasses.field(default_factory=lambda: ["tensorboard"])
    project: str = "tppo"
    run_name: str | None = None
    mlflow_tracking_uri: str | None = None
    progress: bool = True
    eval_every: int = 0
    eval_samples: int = 4
    eval_batch_rows: int | None = None
    checkpoint_every: int = 25
    keep_checkpoints: int = 2
    samples: int = 4
    samples_every: int = 0

    def __post_init__(self) -> None:
        for key in ("eval_samples", "eval_batch_rows"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"log.{key} must be >= 1 (got {getattr(self, key)})")


@dataclasses.dataclass
class SFTConfig:
    """Supervised warm-start of the embedded model on the chain task's traces.

    Attributes:
        output_dir: where the SFT model is saved (and reused when it exists).
        steps: optimizer steps.
        batch_size: traces per step.
        lr: AdamW learning rate (cosine decay to 10 %). 1e-3: at 3e-3 the same 600 steps
            gave 0.358 held-out on one software stack and 0.063 on a later one (final loss
            0.158 vs 0.103 at 1e-3, which gives 0.356 on the later stack).
        mistake_rate: probability that a trace step is off by one (room for RL).
        seed: seed of the traces and the initial weights.
    """

    output_dir: str = "runs/sft-chain"
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    mistake_rate: float = 0.06
    seed: int = 0


@dataclasses.dataclass
class Config:
    """A whole run: every section above."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that span sections."""
        r, a, t = self.rollout, self.algo, self.train
        self.notes: list[str] = []  # derived settings the user should see (printed at start; not a field)
        if a.algorithm in ("ppo", "grpo") and r.window_tokens != r.max_response_tokens:
            # synchronous algorithms generate whole responses: W is L, whatever a shared config says
            self.notes.append(f"algo.algorithm {a.algorithm} generates whole responses: rollout.window_tokens "
                              f"{r.window_tokens} -> {r.max_response_tokens} (rollout.max_response_tokens)")
            r.window_tokens = r.max_response_tokens
        if a.algorithm == "grpo" and t.critic_warmup_steps:  # no critic: its warm-up would train nothing
            self.notes.append(f"algo.algorithm grpo has no critic: train.critic_warmup_steps {t.critic_warmup_steps} -> 0")
            t.critic_warmup_steps = 0
        if a.algorithm == "grpo" and (r.samples_per_prompt < 2 or a.critic_on != "finished"):
            raise ConfigError("algo.algorithm 'grpo' compares each response with its prompt group's and has no critic: it needs "
                              f"rollout.samples_per_prompt >= 2 and algo.critic_on = finished (got {r.samples_per_prompt}, {a.critic_on})")
        if r.num_slots % t.mini_batches:
            raise ConfigError(
                f"train.mini_batches ({t.mini_batches}) must divide the generation batch "
                f"(rollout.prompts_per_step x rollout.samples_per_prompt = {r.num_slots})"
            )
        if self.task.name != "chain" and not self.model.path:
            raise ConfigError(f"task.name '{self.task.name}' needs model.path (a pretrained model): the embedded SFT warm-start "
                              f"is for the chain task")
        if self.model.lora.enabled and self.model.lora.dropout > 0:
            self.notes.append(f"model.lora.dropout {self.model.lora.dropout}: the update's forward is random, so PPO's ratio of "
                              f"an unchanged policy differs from 1 wherever pi_old is recomputed (0 keeps it exact)")
        if a.window_ignore_tokens >= r.min_window:
            raise ConfigError(f"algo.window_ignore_tokens ({a.window_ignore_tokens}) must be < the window "
                              f"(rollout.window_tokens {r.window_tokens}, smallest {r.min_window})")


# ---------------------------------------------------------------------- YAML and overrides


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A :class:`Config` from a YAML file (None: the defaults) and ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {e.start})") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except ConfigError as e:  # from _UniqueKeyLoader
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None
        _set_dotted(data, key.strip(), value)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}{' + overrides' if overrides else ''}: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last
    silently, which would drop half of a section without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):  # every config key is a name; `1:` or `[a]:` is a typo
                raise ConfigError(f"key {key!r} at line {key_node.start_mark.line + 1} is a {type(key).__name__}, not a name")
            if key in seen:
                raise ConfigError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples as lists, as YAML reads them back)."""
    return _lists(dataclasses.asdict(cfg))


def _lists(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    return [_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (valid keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        key, hint = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(hint, value, key + ".")
        else:
            kwargs[name] = _coerce(key, value, hint)
    try:
        return cls(**kwargs)
    except TypeError as e:  # should not happen after the checks above; keep the key context
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{part}' is not a section")
    node[parts[-1]] = value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (int -> float allowed), or a ConfigError naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key '{key}': {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads "1e-3" as a string
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"config key '{key}': expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def diff_configs(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ (for refusing a resume with another config)."""
    flat_a, flat_b = _flatten(to_dict(a)), _flatten(to_dict(b))
    return [k for k in flat_a if flat_a[k] != flat_b.get(k) and not k.startswith(ignore)]


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------- the resolved config, documented


_DOC_ENTRY = re.compile(r"^(\s+)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """Each field's documentation from the class docstring's ``Attributes:`` section (the
    one place a field is documented), continuation lines joined; ``a, b: doc`` documents
    both."""
    text = (cls.__doc__ or "").split("Attributes:", 1)
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in (text[1] if len(text) > 1 else "").splitlines():
        m = _DOC_ENTRY.match(line)
        if m and (indent is None or len(m.group(1)) == indent):
            indent, names = len(m.group(1)), m.group(2).split(", ")
            for n in names:
                docs[n] = m.group(3).strip()
        elif line.strip() and names:
            for n in names:
                docs[n] += " " + line.strip()
    return docs


def describe(cfg: Any, indent: str = "") -> str:
    """The resolved config as YAML, each field followed by its documentation as a comment
    (``tppo config``); ``yaml.safe_load`` of it gives ``to_dict(cfg)``."""
    docs, lines = field_docs(type(cfg)), []
    for f in dataclasses.fields(cfg):
        value, doc = getattr(cfg, f.name), docs.get(f.name, "")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:" + (f"  # {doc}" if doc else ""))
            lines.append(describe(value, indent + "  "))
            continue
        value = _lists(value)
        rendered = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...").removesuffix(" ...")
        lines.append(f"{indent}{f.name}: {rendered}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)
