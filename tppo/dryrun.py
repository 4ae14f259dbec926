"""``tppo train ... --dry-run``: check a run before anything heavy loads.

It builds the config, reads the task's data (one training example and the evaluation
set), resolves the reward and calls it once on that example's answer, checks the model
path without loading weights (a local directory or GGUF file must exist; a hub id is
looked up in the local cache only), renders the first training prompt with the model's
tokenizer when that is on disk, and says what the run would do: algorithm, slots,
windows, steps, devices. It writes nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

from tppo.config import Config, ConfigError
from tppo.rundir import run_artifacts


def dry_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> list[str]:
    """The lines the dry run prints; raises the error the run would meet first."""
    from tppo.trainer import task_examples

    r, a, t = cfg.rollout, cfg.algo, cfg.train
    lines = ["dry run: nothing is loaded for training, nothing is written", *(f"note: {n}" for n in cfg.notes)]
    found = run_artifacts(run_dir)
    lines.append(f"run directory: {run_dir} " + ("(resumed from its last checkpoint)" if resume else
                                                 f"(holds a run: {', '.join(p.name for p in found)}; --resume or --overwrite)" if found
                                                 else "(new)"))
    lines += _model_lines(cfg)
    make_stream, eval_set, notes = task_examples(cfg, t.seed)
    lines += notes
    first = next(iter(make_stream()), None)
    if first is None:
        raise ConfigError(f"task {cfg.task.name}: the training data is empty")
    lines.append(f"data: task {cfg.task.name}, {len(eval_set)} evaluation problems; first training answer {first.answer!r}")
    lines.append(_reward_line(cfg, first))
    lines += _prompt_lines(cfg, first)
    W = r.window_tokens
    windows = "auto" if W == "auto" else math.ceil(r.max_response_tokens / W)
    algorithm = "partial-rollout PPO" if a.train_on == "finished" else a.algorithm
    lines.append(f"run: {algorithm}, {r.num_slots} slots = {r.prompts_per_step} prompts x "
                 f"{r.samples_per_prompt} samples, W = {W}, L = {r.max_response_tokens} (at most {windows} window(s) a response), "
                 f"{t.total_steps} steps, {t.ppo_epochs} epoch(s) x {t.mini_batches} mini-batch(es), device {t.device}"
                 f"{', FSDP' if t.fsdp else ''}, engine {r.engine}")
    return lines


def _model_lines(cfg: Config) -> list[str]:
    from tppo.models import ModelSource, check_source

    m = cfg.model
    if not m.path:
        out = Path(cfg.sft.output_dir)
        state = "exists" if (out / "config.json").exists() else f"missing: trained at start ({cfg.sft.steps} SFT steps)"
        return [f"model: the embedded tiny model, SFT warm-start {out} ({state})"]
    src = ModelSource.of(m.path, m.gguf_file, m.revision)
    check_source(src, probe_hub=False)  # the dry run asks no server: it says whether the cache has it
    if src.is_local:
        return [f"model: local {src.repo}" + (f" ({src.gguf_file})" if src.gguf_file else "")]
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(src.repo, src.gguf_file or "config.json", revision=src.revision)
    return [f"model: hub id {src.repo}" + (" (in the local cache)" if isinstance(cached, str) else " (not in the local cache: downloaded at start)")]


def _reward_line(cfg: Config, example) -> str:
    from tppo.rewards import RewardScorer, RewardSpecError, checked_rewards

    try:
        checked_rewards(cfg.task.reward, cfg.task.reward_batched)
    except RewardSpecError as e:
        raise ConfigError(str(e)) from None
    with RewardScorer.from_task(cfg.task, workers=0) as scorer:
        score = scorer.score([example.prompt], [str(example.answer)], [example.answer])[0]
    return f"reward: {cfg.task.reward} (called once, on the first answer as a completion: {score})"


def _prompt_lines(cfg: Config, example) -> list[str]:
    """The first training prompt as the model will see it, when the tokenizer is on disk."""
    from transformers import AutoTokenizer

    from tppo.models import ModelSource
    from tppo.tasks import PromptSource

    path = cfg.model.path or cfg.sft.output_dir
    src = ModelSource.of(path, cfg.model.gguf_file, cfg.model.revision)
    if not src.is_local:
        return ["prompt: (the tokenizer is not on disk: the rendered prompt is printed at start)"]
    tok = AutoTokenizer.from_pretrained(src.repo, **src.kwargs())
    item = next(iter(PromptSource(lambda: iter([example]), tok, max_prompt_tokens=cfg.task.max_prompt_tokens,
                                  template=cfg.task.template, system=cfg.task.system, chat_template=cfg.task.chat_template)), None)
    if item is None:
        return [f"prompt: the first prompt is longer than task.max_prompt_tokens ({cfg.task.max_prompt_tokens}) or empty"]
    return [f"prompt ({len(item.prompt_ids)} tokens), as the model sees it:", tok.decode(item.prompt_ids)]
