"""LoRA adapters (``model.lora``) through peft: wrapping, the frozen base shared, merged weights.

With ``model.lora.r > 0`` the policy trains low-rank adapters on its linear layers
(peft's LoRA: W + alpha / r x B A, B = 0 at the start so the policy starts as its base),
and the critic trains adapters on its backbone plus its whole value head (peft's
``modules_to_save``). What is frozen is shared, never copied:

* the KL reference is the policy with its adapter disabled (:class:`AdapterDisabled`):
  the base model, which is the initial policy because B starts at 0;
* the critic built from the policy (no ``model.critic_path``) reads the policy's frozen
  backbone tensors (:func:`share_frozen_backbone`): one copy of the base on the device.

Checkpoints hold the adapters (and the value head) only; a resume rebuilds the base
from ``model.path`` (or the SFT warm-start) and loads them. The vLLM engine and
``tppo export`` get merged weights under the base model's names (:func:`merged_state_dict`),
computed beside the adapters so the trained model is never merged and unmerged in place
(W + BA - BA is not W in floating point, and a resume must be exact).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tppo.config import LoraConfig


MISSING_PEFT = "model.lora needs peft: pip install 'tppo[peft]'"


def _peft():
    try:
        import peft
    except ImportError as e:  # an optional extra
        raise ImportError(MISSING_PEFT) from e
    return peft


def check_available(spec: LoraConfig) -> None:
    """Refuse ``model.lora`` without peft before anything loads (a one-line error, exit 2)."""
    import importlib.util

    if spec.enabled and importlib.util.find_spec("peft") is None:
        raise ImportError(MISSING_PEFT)


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a peft model (without importing peft when it is not installed)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft model (or :class:`AdapterDisabled`), else ``model``:
    for reading its forward's signature and its config."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def target_modules(model: torch.nn.Module, spec: LoraConfig) -> list[str]:
    """The module names that get adapters. ``all-linear``: the names of every linear layer of
    the backbone (``model.base_model``), so neither the LM head nor the value head gets one
    (peft's own ``all-linear`` spares only a causal LM's output layer)."""
    if spec.target_modules != "all-linear":
        return list(spec.target_modules)
    names = {name.rsplit(".", 1)[-1] for name, m in model.base_model.named_modules() if isinstance(m, torch.nn.Linear)}
    if not names:
        raise ValueError(f"model.lora.target_modules all-linear: {type(model).__name__}'s backbone has no linear layer")
    return sorted(names)


def peft_config(model: torch.nn.Module, spec: LoraConfig, critic: bool):
    peft = _peft()
    return peft.LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=target_modules(model, spec),
                           task_type=peft.TaskType.TOKEN_CLS if critic else peft.TaskType.CAUSAL_LM)


def add_lora(model: torch.nn.Module, spec: LoraConfig, critic: bool = False) -> torch.nn.Module:
    """``model`` with fresh adapters (A random, B = 0), every other weight frozen; a critic's
    value head (``score``) trains in full. The adapters' random init runs under its own
    seed so the caller's RNG (the run's sampling) is the same with and without LoRA."""
    peft = _peft()
    config = peft_config(model, spec, critic)
    names = [k for k, _ in model.named_modules()]
    missing = [n for n in config.target_modules if not any(k == n or k.endswith("." + n) for k in names)]  # peft's matching rule
    if missing:  # checked before peft changes the model in place
        raise ValueError(f"model.lora.target_modules: no module named {missing[0]!r} in {type(model).__name__}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(model, config)


def load_lora(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """``model`` (the base) with the trainable adapters saved in ``path`` (a checkpoint's
    ``policy/`` or ``critic/``)."""
    return _peft().PeftModel.from_pretrained(model, str(path), is_trainable=True)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer updates: every one of a full model, the adapters (and a
    critic's head) of a LoRA one. Frozen parameters never enter the optimizer, so its state
    holds nothing for them."""
    return [p for p in model.parameters() if p.requires_grad]


def share_frozen_backbone(critic: torch.nn.Module, policy: torch.nn.Module) -> int:
    """Make the critic's backbone tensors the policy's own (before either gets adapters):
    both are frozen under LoRA and equal (``models.critic_from_policy`` copied them), so one
    copy serves both. Returns the number of elements no longer held twice."""
    mine = dict(critic.base_model.named_parameters())
    shared = 0
    for name, p in policy.base_model.named_parameters():
        q = mine.get(name)
        if q is not None and q.shape == p.shape and q.dtype == p.dtype and q.device == p.device and torch.equal(q, p):
            q.data = p.data
            shared += p.numel()
    return shared


class AdapterDisabled(torch.nn.Module):
    """The LoRA policy with its adapter disabled: its base model, the KL reference (the
    initial policy, as B starts at 0) without a second copy of the weights. The policy is
    held outside the module tree so its parameters are not registered twice."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self._policy = (policy,)

    def get_base_model(self) -> torch.nn.Module:
        return self._policy[0].get_base_model()

    @property
    def config(self):
        return self._policy[0].config

    def forward(self, *args, **kwargs):
        with self._policy[0].disable_adapter():
            return self._policy[0](*args, **kwargs)


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` with its active adapter merged (W + alpha / r x B A), under
    the base model's own names (``model.layers.0.self_attn.q_proj.weight``), ``model``
    unchanged; a critic's trained head replaces the original. A full model's own state."""
    if not is_lora(model):
        return dict(model.state_dict())
    peft = _peft()
    base, adapter = model.get_base_model(), model.active_adapter
    layers = {f"{name}.weight": m for name, m in base.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer) and adapter in m.lora_A}
    out: dict[str, torch.Tensor] = {}
    for name, t in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        # one layer's delta at a time: never every delta at once beside the merged copy (vLLM shares the GPU)
        out[name] = (t + layers[name].get_delta_weight(adapter).to(t.dtype)) if name in layers else t
    return out


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model holding the merged weights (for ``tppo export``); the
    LoRA model's own modules are consumed (peft's ``merge_and_unload``)."""
    return model.merge_and_unload() if is_lora(model) else model
