"""A checkpoint's policy as a plain Hugging Face model (``tppo export``, ``tppo eval``).

A full fine-tune's checkpoint (``RUN/checkpoints/step-N/policy``) is already a Hugging
Face directory. A LoRA run's holds adapters only (tppo/lora.py): its base is the run's
initial policy, ``model.path`` of the run's ``config.yaml`` (or its SFT warm-start), and
the exported model is the base with the adapters merged, which ``from_pretrained``
loads with neither tppo nor peft.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tppo import lora
from tppo.config import Config, ConfigError, load_config
from tppo.models import ModelSource, load_pretrained, save_pretrained


BASE_FILE = "tppo_base.json"  # in a LoRA checkpoint's policy/: the adapters' base, resolved when it was written


def policy_dir(path: str | Path) -> Path:
    """``RUN/checkpoints/step-N`` or its ``policy/``: the policy's directory (absolute)."""
    path = Path(path).resolve()
    if (path / "policy").is_dir():
        path = path / "policy"
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise FileNotFoundError(f"{path}: not a checkpoint (no policy/ with config.json or adapter_config.json): "
                                f"give RUN_DIR/checkpoints/step-N")
    return path


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def run_config(policy: Path) -> Config:
    """The config.yaml of the run whose checkpoint ``policy`` is (RUN/checkpoints/step-N/policy)."""
    for parent in policy.parents:
        if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
            return load_config(parent.parent / "config.yaml")
    raise ConfigError(f"{policy} lies in no run directory (RUN/checkpoints/step-N/policy with RUN/config.yaml), where "
                      f"a LoRA checkpoint's base model is named")


def base_source(cfg: Config) -> ModelSource:
    """The initial policy of a run: model.path, or its SFT warm-start."""
    m = cfg.model
    return ModelSource.of(m.path, m.gguf_file, m.revision) if m.path else ModelSource.of(cfg.sft.output_dir)


def load_policy(path: str | Path, dtype: torch.dtype = torch.float32, cfg: Config | None = None):
    """(model, tokenizer) of a checkpoint's policy; a LoRA one merged into its base
    (``cfg``: the run's config, default its config.yaml)."""
    policy = policy_dir(path)
    if not is_adapter(policy):
        return load_pretrained(ModelSource.of(policy), dtype=dtype)
    if (policy / BASE_FILE).is_file():  # written with the checkpoint: independent of the directory it is read from
        src = ModelSource(**json.loads((policy / BASE_FILE).read_text()))
    else:
        src = base_source(cfg or run_config(policy))
    base, tokenizer = load_pretrained(src, dtype=dtype)  # the run's own tokenizer
    return lora.merged_model(lora.load_lora(base, policy)), tokenizer


def export_checkpoint(path: str | Path, out: str | Path, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Path]:
    """Write the checkpoint's policy (merged if LoRA) as a plain Hugging Face directory, in
    ``dtype`` (None: the run's ``model.dtype``, float32 outside a run)."""
    if dtype is None:
        policy = policy_dir(path)
        try:
            dtype = getattr(torch, run_config(policy).model.dtype)
        except ConfigError:
            dtype = torch.float32
    model, tokenizer = load_policy(path, dtype)
    save_pretrained(model, tokenizer, out)
    return model, Path(out)
