"""Shared by the trainer and reliability tests: a tiny model and a small config."""

from __future__ import annotations

from pathlib import Path

from tppo.config import Config, TinyModelConfig, load_config
from tppo.models import build_tiny, save_pretrained

TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)

BASE_OVERRIDES = (
    "log.tensorboard=false", "log.progress=false",
    "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2", "rollout.window_tokens=6",
    "rollout.max_response_tokens=18", "task.eval_problems=4", "log.eval_samples=2", "train.total_steps=2",
    "train.micro_batch_rows=4", "train.policy_lr=1e-3", "train.critic_lr=1e-3", "log.checkpoint_every=0",
)


def save_tiny(path: Path, seed: int = 0) -> str:
    model, tok = build_tiny(TINY, seed=seed)
    save_pretrained(model, tok, path)
    return str(path)


def make_cfg(model_dir, run_dir, *overrides) -> Config:
    return load_config(None, [f"model.path={model_dir}", f"log.run_dir={run_dir}", *BASE_OVERRIDES, *overrides])


def deterministic_metrics(run_dir, also_ignore: tuple[str, ...] = ()) -> list[dict]:
    """The run's metrics.jsonl without what legitimately differs between equal runs:
    timings (``time/``, ``*tokens_per_s``) and any key starting with ``also_ignore``."""
    from tppo.metrics import read_metrics

    skip = ("time/", *also_ignore)
    return [{k: v for k, v in m.items() if not k.startswith(skip) and not k.endswith("tokens_per_s")} for m in read_metrics(run_dir)]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def capped_prompts(trainer, cap_of) -> None:
    """Give every prompt of the trainer's stream the per-prompt cap ``cap_of(prompt_id)``
    (a response reaching it finishes: lengths under the test's control)."""
    import dataclasses

    trainer.engine.prompts = (dataclasses.replace(p, max_response_tokens=cap_of(p.prompt_id)) for p in trainer.source)
