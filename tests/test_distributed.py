"""Data parallelism on 2 CPU ranks (gloo): one update on 2 ranks equals one process on
the concatenated batch, with replicas and with FSDP2 sharding; global whitening; a 2-rank training run with checkpoint and
resume through torchrun; a dead rank makes the other fail instead of hanging."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from trainer_helpers import deterministic_metrics, make_cfg

from tppo import algos, distributed, lora, sharding
from tppo.config import LoraConfig, save_config
from tppo.models import critic_from_policy, load_pretrained
from tppo.updates import StepBatch, update_critic, update_policy

B, S = 8, 12


def fixed_batch(vocab: int) -> StepBatch:
    """8 rows; rows 4-7 (rank 1's half) have no finished rows: no critic tokens there.
    Rows 2 and 4 are carried, so with micro-batches of 2 rows rank 0's first micro-batch
    has no prefix while rank 1's has one."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (B, S), generator=g)
    lengths = torch.tensor([12, 9, 7, 12, 10, 6, 12, 8])
    attn = torch.arange(S)[None] < lengths[:, None]
    resp = attn[:, 1:] & (torch.arange(1, S)[None] >= 4)  # tokens 4.. are the response
    policy = resp & (torch.rand(B, S - 1, generator=g) < 0.8)
    policy[[2, 4], :6] = False  # rows 2 and 4 carried: response tokens of an earlier window before this one's
    critic = resp & (torch.arange(B)[:, None] < 3)
    return StepBatch(ids, attn, policy, critic, resp & (torch.arange(B)[:, None] == 0),
                     old_logprobs=-torch.rand(B, S - 1, generator=g) * 3, old_values=torch.randn(B, S - 1, generator=g) * 0.1,
                     advantages=torch.randn(B, S - 1, generator=g), returns=torch.rand(B, S - 1, generator=g), response_mask=resp,
                     behavior_logprobs=-torch.rand(B, S - 1, generator=g) * 3, stale=torch.zeros_like(resp))


def rows(batch: StepBatch, sl: slice) -> StepBatch:
    return StepBatch(**{k: v[sl] for k, v in vars(batch).items()})


def one_update(model_dir: str, batch: StepBatch, cfg_dir: Path, fsdp: bool = False, prefix_grad: bool = True, lora_r: int = 0):
    """The updated weights (gathered to rank 0 when sharded; None on rank 1 then). With
    ``lora_r``, adapters on both models (the same initialisation on every rank), and the
    policy's merged weights as the vLLM engine would be sent them ("merged")."""
    cfg = make_cfg(model_dir, cfg_dir, "train.micro_batch_rows=2", "algo.lm_loss_coef=0.1", "train.grad_clip=0.5",
                   f"algo.prefix_grad={str(prefix_grad).lower()}")
    policy, _ = load_pretrained(model_dir)
    critic = critic_from_policy(policy)
    if lora_r:
        torch.manual_seed(0)
        spec = LoraConfig(r=lora_r, alpha=2.0 * lora_r)
        policy, critic = lora.add_lora(policy, spec), lora.add_lora(critic, spec, critic=True)
    out = {}
    for name, model, fn, lr in (("policy", policy, update_policy, 1e-2), ("critic", critic, update_critic, 1e-2)):
        if fsdp:
            sharding.shard(model, torch.device("cpu"))
        opt = torch.optim.AdamW(lora.trainable_parameters(model), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
        fn(model, opt, sched, batch, cfg, torch.Generator().manual_seed(0), torch.device("cpu"))
        state = sharding.full_model_state(model) if fsdp else model.state_dict()
        out[name] = state and {k: v.detach().clone() for k, v in state.items()}
    if lora_r:
        from tppo.rollout.vllm_engine import weights_for_vllm

        out["merged"] = dict(weights_for_vllm(policy, to_cpu=True))  # a collective when sharded
    return out


def _rank_worker(rank: int, model_dir: str, tmp: str, fsdp: bool, prefix_grad: bool, lora_r: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    batch = fixed_batch(load_pretrained(model_dir)[0].config.vocab_size)
    half = rows(batch, slice(4 * rank, 4 * rank + 4))
    whitened = algos.masked_whiten(half.advantages, half.policy_mask, all_reduce=distributed.sum_)
    torch.save({"whitened": whitened, **one_update(model_dir, half, Path(tmp), fsdp, prefix_grad, lora_r)}, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("fsdp,prefix_grad,lora_r", [(False, True, 0), (True, True, 0), (True, False, 0), (True, True, 4)],
                         ids=["replicas", "fsdp2", "fsdp2-noprefixgrad", "fsdp2-lora"])
def test_two_ranks_update_equals_one_process_on_the_whole_batch(model_dir, tmp_path, fsdp, prefix_grad, lora_r):
    """Rank 1's half has no critic rows: the critic update pads its micro-batches
    (FSDP) or contributes a zero gradient (replicas). With ``prefix_grad: false`` some
    micro-batches have no prefix on one rank and one on the other: the same forwards
    must run on both (tppo/prefix.py, always_split). With LoRA, FSDP2 shards frozen and
    trained parameters together; the merged weights gathered for vLLM are the whole model's."""
    if lora_r:
        pytest.importorskip("peft")
    mp.spawn(_rank_worker, args=(model_dir, str(tmp_path), fsdp, prefix_grad, lora_r), nprocs=2, join=True)
    batch = fixed_batch(load_pretrained(model_dir)[0].config.vocab_size)
    single = one_update(model_dir, batch, tmp_path, prefix_grad=prefix_grad, lora_r=lora_r)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    whole = algos.masked_whiten(batch.advantages, batch.policy_mask)
    torch.testing.assert_close(torch.cat([ranks[0]["whitened"], ranks[1]["whitened"]]), whole, atol=1e-6, rtol=1e-5)
    for part in ("policy", "critic", "merged") if lora_r else ("policy", "critic"):
        if lora_r and part != "merged":  # a sharded LoRA model's gathered state leaves its frozen base out (sharding.full_model_state)
            assert ranks[0][part].keys() < single[part].keys(), part
            # torch keeps a tied frozen weight under its second name (the tiny model ties lm_head to the embeddings)
            assert {k for k in ranks[0][part] if "lora_" not in k and ".modules_to_save." not in k} <= {"base_model.model.lm_head.weight"}
            assert any("lora_A" in k for k in ranks[0][part]) and any("lora_B" in k for k in ranks[0][part]), part
        else:
            assert ranks[0][part].keys() == single[part].keys(), part
        for k, v in ((k, v) for k, v in single[part].items() if k in ranks[0][part]):
            torch.testing.assert_close(ranks[0][part][k], v, atol=1e-5, rtol=1e-4, msg=f"{part} {k}")
            if not fsdp or part == "merged":
                assert torch.equal(ranks[0][part][k], ranks[1][part][k]), "ranks must hold identical weights"
    initial = critic_from_policy(load_pretrained(model_dir)[0]).state_dict()
    if lora_r:
        trained = [k for k in single["policy"] if "lora_B" in k]
        assert trained and all(single["policy"][k].abs().sum() > 0 for k in trained), "the adapters left B = 0"
        assert single["merged"].keys() == load_pretrained(model_dir)[0].state_dict().keys(), "merged: the base model's names"
    else:
        assert any(not torch.equal(single["critic"][k], v) for k, v in initial.items())


def _dying_worker(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdzv2", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=15))
    distributed.sum_int(1)
    if rank == 1:
        os._exit(3)  # dies without a word
    t0 = time.monotonic()
    try:
        distributed.sum_int(1)
    except RuntimeError as e:  # gloo: connection closed by peer, or the timeout
        Path(tmp, "rank0.txt").write_text(f"{time.monotonic() - t0:.1f} {type(e).__name__}: {e}")
        os._exit(0)
    os._exit(5)


def test_a_dead_rank_makes_the_other_fail_not_hang(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_dying_worker, args=(r, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
    assert procs[0].exitcode == 0, f"rank 0 exit code {procs[0].exitcode} (None: it hung)"
    waited = float((tmp_path / "rank0.txt").read_text().split()[0])
    assert waited < 30


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "tppo.cli", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("fsdp,extra", [(False, ()), (True, ()), (True, ("model.lora.r=4", "algo.kl_coef=0.1"))],
                         ids=["replicas", "fsdp2", "fsdp2-lora"])
def test_two_rank_run_checkpoints_and_resumes_exactly(model_dir, tmp_path, fsdp, extra):
    """With LoRA: adapters-only checkpoints of sharded models, the KL reference the
    sharded policy with its adapter off (not sharded again)."""
    if extra:
        pytest.importorskip("peft")
    cfg = make_cfg(model_dir, tmp_path / "unused", "train.total_steps=3", "log.checkpoint_every=1", "train.device=cpu",
                   "train.torch_threads=1", f"train.fsdp={str(fsdp).lower()}", *extra)
    save_config(cfg, tmp_path / "c.yaml")
    full = _torchrun("--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = _torchrun("--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cut"), "train.total_steps=2")
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = _torchrun("--resume", str(tmp_path / "cut"), "train.total_steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # timings differ; the cut run also evaluated at its last step (2)
    a, b = deterministic_metrics(tmp_path / "full", ("eval/",)), deterministic_metrics(tmp_path / "cut", ("eval/",))
    assert [m["step"] for m in a] == [1, 2, 3] and a == b
    # both ranks generated: the logged counts are the sum over ranks of 2 prompts x 2 samples each
    assert a[0]["rollout/finished_rows"] + a[0]["rollout/carried_rows"] == 8
    if extra:
        step = tmp_path / "full" / "checkpoints" / "step-000003"
        assert (step / "policy" / "adapter_model.safetensors").is_file() and not (step / "policy" / "model.safetensors").exists()
        assert a[-1]["policy/kl"] > 0, "the reference (adapter off) differs from the trained policy"
    single = subprocess.run([sys.executable, "-m", "tppo.cli", "train", "--resume", str(tmp_path / "cut"), "train.total_steps=4"],
                            capture_output=True, text=True)
    assert single.returncode == 2 and ("train.fsdp shards" if fsdp else "written by 2 ranks") in single.stderr


def test_an_fsdp_checkpoint_in_the_critic_warmup_leaves_the_run_as_it_was(model_dir, tmp_path):
    """torch's get_optimizer_state_dict gives an optimizer that has not stepped a zero-gradient
    step at lr 0 first: checkpointing the policy's optimizer during the critic-only warm-up
    counted as AdamW's first step, and the first real update (step 2) came out smaller."""
    runs = []
    for every in (0, 1):
        cfg = make_cfg(model_dir, tmp_path / "unused", "train.total_steps=3", "train.critic_warmup_steps=1", f"log.checkpoint_every={every}",
                       "log.keep_checkpoints=3", "train.device=cpu", "train.torch_threads=1", "train.fsdp=true")
        save_config(cfg, tmp_path / f"c{every}.yaml")
        res = _torchrun("--config", str(tmp_path / f"c{every}.yaml"), "--run-dir", str(tmp_path / f"run{every}"))
        assert res.returncode == 0, res.stderr[-3000:]
        runs.append(deterministic_metrics(tmp_path / f"run{every}"))
    assert [m["policy/updated"] for m in runs[0]] == [0, 1, 1] and runs[0] == runs[1]
    assert (tmp_path / "run1" / "checkpoints" / "step-000001").is_dir()


def _rank_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (descendants of ``parent`` with RANK in their environment)."""
    out, todo = {}, [parent]
    while todo:
        pid = todo.pop()
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        todo += [int(c) for c in children]
        rank = next((int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")), None)
        if rank is not None and pid != parent:
            out.setdefault(rank, pid)
    return out


def test_a_stop_signal_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(model_dir, tmp_path):
    """SIGINT to rank 1 alone: both ranks agree on the stop at the next step boundary, the
    checkpoint of that step is written, and resuming it under torchrun equals the
    uninterrupted two-rank run."""
    import signal

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from soak import logged_steps

    total = 6
    cfg = make_cfg(model_dir, tmp_path / "unused", f"train.total_steps={total}", "log.checkpoint_every=0", "train.device=cpu",
                   "train.torch_threads=1")
    save_config(cfg, tmp_path / "c.yaml")
    full = _torchrun("--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tppo.cli", "train",
           "--config", str(tmp_path / "c.yaml"), "--run-dir", str(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while logged_steps(tmp_path / "cut") < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    saved = [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()]
    assert len(saved) == 1 and 2 <= int(saved[0].split("-")[1]) < total, (saved, err[-3000:])
    # rank 0 says it once; no traceback of tppo's (torchrun reports its workers' exit 130 with its own)
    assert err.count(f"tppo train --resume {tmp_path / 'cut'}") == 1 and "/tppo/" not in err, err[-3000:]
    resumed = _torchrun("--resume", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = deterministic_metrics(tmp_path / "full", ("eval/",)), deterministic_metrics(tmp_path / "cut", ("eval/",))
    assert [m["step"] for m in b] == list(range(1, total + 1)) and a == b
