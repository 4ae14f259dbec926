"""Data parallelism on torch.distributed: the process group, sums across ranks, gradients.

Launched by ``torchrun --nproc_per_node N -m tppo.cli train ...`` (or several nodes with
``--nnodes``/``--rdzv-endpoint``), every rank runs the same trainer loop on its own
share of the generation batch (``prompts_per_step / N`` prompts, its own slice of the
prompt stream, its own sampling seed). What makes N ranks equal one process on the
concatenated batch (tests/test_distributed.py):

  * advantages are whitened with the statistics of all ranks' policy tokens
    (:func:`tppo.algos.masked_whiten` with ``all_reduce=sum_``);
  * every loss divides by the token count summed over ranks, and the gradients are
    summed (not averaged) over ranks before clipping, so the update is the gradient
    of the global token-mean loss;
  * every rank takes the same number of optimizer steps: a rank without rows in a
    mini-batch contributes a zero gradient.

Gradients are reduced explicitly, one flattened all-reduce per optimizer step, rather
than by DDP's backward hooks: DDP needs every rank to run the same number of
backward passes, and T-PPO's critic trains on the finished rows only, which differ in
number from rank to rank (a rank may have none). The collective is torch.distributed's
(gloo on CPU, NCCL on GPUs). With ``train.fsdp`` the models are sharded instead
(tppo.sharding) and the reduction is FSDP's reduce-scatter.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device, timeout_s: float) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when alone.

    ``timeout_s`` bounds every collective: a rank that dies or hangs makes the others
    fail with an error after at most this long instead of waiting forever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def sum_(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a new tensor; x itself when alone)."""
    if not active():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y


def sum_int(n: int) -> int:
    """An integer count summed over ranks."""
    return int(sum_(torch.tensor(n, dtype=torch.int64)).item()) if active() else n


def max_int(n: int) -> int:
    """The largest of an integer over ranks."""
    if not active():
        return n
    t = torch.tensor(n, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Sum every parameter's gradient over ranks (missing gradients count as zero)."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def gather_to_main(obj):
    """A list of every rank's ``obj`` on rank 0 (None elsewhere); [obj] when alone."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def shutdown(synchronize: bool = True) -> None:
    """Destroy the process group; first, with ``synchronize``, wait until every rank is
    here. A rank that tears gloo down while a peer's last send is still in flight can die
    in C++ ("terminate called without an active exception"; seen once in the two-rank
    resume test). No barrier where a rank may be gone (an interrupted run)."""
    if active():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
