"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the policy, critic and reference.

With ``train.fsdp: true`` every model's parameters, gradients and optimizer states are
sharded over the data-parallel ranks (ZeRO-3): one decoder layer at a time is
all-gathered for its forward and backward, and gradients are reduce-scattered. What the
trainer must do differently, and why:

* **Gradient sums, not means**: the losses already divide by the global token count
  (tppo.distributed), so the gradient is the sum over ranks, exactly as the explicit
  all-reduce of the unsharded path makes it; FSDP's reduce-scatter averages, so
  :func:`sync_gradients` multiplies by the world size (a custom divide factor would
  need NCCL's PREMUL_SUM, which gloo lacks).
* **Equal collectives on every rank**: each sharded forward/backward is a collective, so
  every rank runs the same number of micro-batches per mini-batch; a rank with fewer
  rows pads with zero-weight micro-batches (:func:`padded_micro_batches`). T-PPO's
  critic rows (finished responses only) differ from rank to rank, which is why this
  matters here more than in synchronous PPO.
* **Generation and evaluation without collectives**: the rollout engine and the
  rank-0 evaluation run a data-dependent number of forwards (ranks finish at different
  times), so they run inside :func:`gathered`, which all-gathers the whole model once
  and keeps it unsharded until the block ends (the memory of one full replica, the
  same as a colocated vLLM engine holds).
* **Checkpoints hold full tensors**: :func:`full_model_state` and
  :func:`full_optimizer_state` gather them to rank 0 so a checkpoint is a plain
  Hugging Face model directory, independent of the number of ranks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from tppo import distributed


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Apply FSDP2 in place: one unit per decoder layer (the classes the model lists in
    ``_no_split_modules``), then the root for the embeddings, norm and head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not distributed.active():
        raise RuntimeError("train.fsdp shards the models over data-parallel ranks: launch with "
                           "`torchrun --nproc_per_node N -m tppo.cli train ...` (N >= 2)")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) > 1 and torch.__version__ < "2.8":
        # LoRA's adapters stay float32 on a bfloat16 base (peft's autocast_adapter_dtype); FSDP2 before torch 2.8
        # requires one dtype per unit and fails at the first forward
        raise RuntimeError(f"train.fsdp with parameters of several dtypes ({', '.join(sorted(map(str, dtypes)))}: LoRA adapters "
                           f"on a {'bfloat16' if torch.bfloat16 in dtypes else 'lower-precision'} base) needs torch >= 2.8 "
                           f"(this is {torch.__version__}); or set model.dtype=float32")
    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise ValueError(f"train.fsdp: {type(model).__name__} names no decoder layer class in _no_split_modules; "
                         f"cannot choose FSDP units")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: torch.nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module | None) -> Iterator[None]:
    """Inside the block the model is whole on every rank, and its forwards issue no
    collectives (any number of them, per rank). All ranks must enter and leave it
    together: entering all-gathers every unit. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    for unit in units:  # the same order on every rank: matched all-gathers
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP's default for the root
        for unit in units:
            unit.reshard()


def padded_micro_batches(micros: list[list[int]], model: torch.nn.Module) -> list[tuple[list[int], bool]]:
    """(rows, real) per micro-batch. Sharded, every rank gets the largest count over
    ranks: the padding repeats row 0 with ``real = False`` (its loss is weighted 0)."""
    if not is_sharded(model):
        return [(m, True) for m in micros]
    n = distributed.max_int(len(micros))
    return [(m, True) for m in micros] + [([0], False)] * (n - len(micros))


def sync_gradients(model: torch.nn.Module) -> None:
    """Sum gradients over ranks. Sharded, FSDP reduce-scattered their mean during the
    backward passes: scale it back to the sum."""
    if not is_sharded(model):
        distributed.all_reduce_grads(model)
        return
    world = distributed.world_size()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(world)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """A sharded model's whole state dict on rank 0 (CPU tensors; collective: every
    rank calls it); None elsewhere and for an unsharded model (save its own). A LoRA
    model's frozen base is left out before anything is gathered: its checkpoint holds the
    adapters (and a critic's trained head) only, and the base is never a second time in
    rank 0's memory (torch still gathers a tied frozen weight under its second name, e.g. a
    tied LM head; peft's save drops it)."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from tppo.lora import is_lora

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=is_lora(model))
    state = get_model_state_dict(model, options=options)
    return state if distributed.is_main() else None


# A sharded optimizer that has not stepped yet (the policy's during the critic-only warm-up), as saved.
UNSTEPPED = {"unstepped": True}


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The optimizer's whole state on rank 0 (keyed by parameter name when sharded).

    A sharded optimizer that has not stepped is saved as :data:`UNSTEPPED`: torch's
    ``get_optimizer_state_dict`` (and ``set_``) would first initialise its state with a
    zero-gradient step at lr 0, which counts as AdamW's first step and changes the bias
    correction of the first real update, so a run would depend on when it was checkpointed.
    The ranks step together, so all of them take this branch or none."""
    if not is_sharded(model):
        return opt.state_dict() if distributed.is_main() else None
    if not opt.state:
        return dict(UNSTEPPED) if distributed.is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if distributed.is_main() else None


def load_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore what :func:`full_optimizer_state` saved; each rank keeps its shard."""
    if not is_sharded(model):
        opt.load_state_dict(state)
        return
    if state == UNSTEPPED:  # a fresh optimizer is what was saved
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, opt, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
