"""GPU check: what a decode step, a rollout and a training step cost on this accelerator.

One command, torch and transformers only, no downloads: randomly initialised models with
real architectures' shapes (Qwen2.5-0.5B and -1.5B; timing does not depend on the
weights). Four measurements, written to ``benchmarks/results/gpu_check.json``:

1. **decode step time** over batch size (1-256) and context length (1K-8K): one token
   per row against a static KV cache already holding the context (its contents do not
   change the cost, so no prefill is paid for it);
2. **the cost model's constants**, fitted by least squares on (1):
   ``step_s = decode_step_s + decode_row_s * B + kv_token_s * B * C`` (the form of
   ``benchmarks/gpu_projection.py``, which reads them from the JSON when it exists);
3. **rollout replay**: tppo's embedded engine generates the same prompts with the same
   forced long-tailed lengths (per-prompt caps from a log-normal, ``ignore_eos``) as
   synchronous PPO (W = L), T-PPO as the paper runs it (W = L/4) and T-PPO with in-window
   refill; seconds per prompt and their ratios;
4. **training step time**: forward + backward of the policy over B x S tokens, per token.

    python benchmarks/gpu_check.py                # on a GPU: about 5 minutes on one H100/H200
    python benchmarks/gpu_check.py --cpu-smoke    # the same code, tiny, on the CPU (a test runs it)

Budget: ``--budget-s`` (default 420) stops the decode grid early rather than overrun.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, write_json  # noqa: E402

# Shapes of real checkpoints (their config.json), built with random weights.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512),
}
FULL = dict(shapes=["qwen2.5-0.5b", "qwen2.5-1.5b"], batches=[1, 8, 32, 64, 128, 256], contexts=[1024, 2048, 4096, 8192],
            decode_steps=16, replay_shape="qwen2.5-0.5b", replay_prompts=128, replay_slots=64, replay_L=1024,
            train_rows=8, train_seq=2048)
SMOKE = dict(shapes=["tiny"], batches=[1, 4], contexts=[16, 32], decode_steps=4, replay_shape="tiny", replay_prompts=8,
             replay_slots=4, replay_L=32, train_rows=2, train_seq=32)


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------- 1-2: decode steps and the fit


@torch.inference_mode()
def decode_step_s(model, batch: int, context: int, steps: int, device: torch.device) -> float:
    """Seconds per decode step of ``batch`` rows each attending to ``context`` cached tokens."""
    from transformers import StaticCache

    from tppo.rollout.embedded import cache_kwarg

    cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
    kw = {cache_kwarg(model): cache}
    ids = torch.randint(3, model.config.vocab_size, (batch, 1), device=device)
    model(input_ids=ids, position_ids=torch.zeros_like(ids), use_cache=True, **kw)  # allocates the layers
    for layer in cache.layers:  # the context is "already cached": the write position moves past it
        layer.cumulative_length = torch.tensor(context, dtype=torch.long, device=device)
    attn = torch.ones(batch, context + steps + 1, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        pos = torch.full((batch, 1), context + s, device=device)
        model(input_ids=ids, attention_mask=attn[:, : context + s + 1], position_ids=pos, use_cache=True, logits_to_keep=1, **kw)
    sync(device)
    return (time.perf_counter() - t0) / steps


def fit(points: list[dict]) -> dict:
    """Least squares of step_s = a + b B + c B C over the measured points."""
    X = torch.tensor([[1.0, p["batch"], p["batch"] * p["context"]] for p in points], dtype=torch.float64)
    y = torch.tensor([p["step_s"] for p in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1).tolist()
    pred = X @ torch.tensor(coef, dtype=torch.float64)
    worst = float(((pred - y).abs() / y).max())
    return {"decode_step_s": coef[0], "decode_row_s": coef[1], "kv_token_s": coef[2], "max_relative_error": worst}


# ---------------------------------------------------------------------- 3: rollout replay


def forced_lengths(n: int, L: int, seed: int = 0) -> list[int]:
    """Long-tailed response lengths: log-normal, median L/8, sigma 1, clipped to [1, L]."""
    rng = random.Random(seed)
    return [max(1, min(L, round(L / 8 * math.exp(rng.gauss(0.0, 1.0))))) for _ in range(n)]


def replay(model, device: torch.device, prompts: int, slots: int, L: int) -> dict:
    """Seconds and decode steps to generate the same prompts with forced lengths: PPO (W = L),
    T-PPO (W = L/4), T-PPO with in-window refill; their ratios to PPO per prompt."""
    from tppo.config import RolloutConfig
    from tppo.rollout import EmbeddedEngine, PromptItem

    lengths = forced_lengths(prompts, L)
    prompt_ids = [[5 + i % 7] * 32 for i in range(prompts)]
    runs = {"ppo": dict(window_tokens=L), "tppo": dict(window_tokens=L // 4),
            "tppo_refill": dict(window_tokens=L // 4, refill_within_window=True)}
    out = {}
    for name, kw in runs.items():
        cfg = RolloutConfig(prompts_per_step=slots, samples_per_prompt=1, max_response_tokens=L, ignore_eos=True, **kw)
        items = [PromptItem(i, ids, max_response_tokens=n) for i, (ids, n) in enumerate(zip(prompt_ids, lengths))]
        engine = EmbeddedEngine(cfg, items, eos_token_ids=2, pad_token_id=0, device=device)
        t0, steps, done = time.perf_counter(), 0, 0
        while (wb := engine.generate_window(model, 0)).rows:
            steps += wb.stats.decode_steps
            done += sum(r.finished for r in wb.rows)
        sync(device)
        out[name] = {"seconds": time.perf_counter() - t0, "decode_steps": steps, "finished": done}
    for name in ("tppo", "tppo_refill"):
        out[f"{name}_speedup_per_prompt"] = out["ppo"]["seconds"] / out[name]["seconds"]
        out[f"{name}_decode_step_ratio"] = out["ppo"]["decode_steps"] / out[name]["decode_steps"]
    out["lengths"] = {"prompts": prompts, "slots": slots, "L": L, "median": sorted(lengths)[prompts // 2], "max": max(lengths)}
    return out


# ---------------------------------------------------------------------- 4: a training step


def train_token_s(model, device: torch.device, rows: int, seq: int, repeats: int = 3) -> float:
    """Seconds per token of forward + backward over rows x seq tokens (a policy update pass)."""
    model.train()
    ids = torch.randint(3, model.config.vocab_size, (rows, seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for _ in range(repeats + 1):  # the first is warm-up
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    model.eval()
    return min(times[1:]) / (rows * seq)


# ---------------------------------------------------------------------- the driver


def run(p: dict, device: torch.device, budget_s: float) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t_start, decode, fits = time.perf_counter(), {}, {}
    for shape in p["shapes"]:
        model = build(shape, device, dtype)
        points = []
        for context in p["contexts"]:
            for batch in p["batches"]:
                if time.perf_counter() - t_start > budget_s * 0.5:
                    break  # half the budget for the grid: replay and training must still run
                points.append({"batch": batch, "context": context, "step_s": decode_step_s(model, batch, context, p["decode_steps"], device)})
        decode[shape], fits[shape] = points, fit(points) if len(points) >= 3 else None
        del model
    model = build(p["replay_shape"], device, dtype)
    result = {"decode": decode, "fit": fits,
              "replay": replay(model, device, p["replay_prompts"], p["replay_slots"], p["replay_L"]),
              "train_token_s": {p["replay_shape"]: train_token_s(model, device, p["train_rows"], p["train_seq"])},
              "seconds": time.perf_counter() - t_start}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the code, measures nothing useful")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--out", help="output JSON (default: benchmarks/results/gpu_check.json; --cpu-smoke: gpu_check_smoke.json)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or use --cpu-smoke")
    result = run(SMOKE if args.cpu_smoke else FULL, device, args.budget_s)
    payload = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "commit": commit(), "machine": machine(), **result}
    # --out is a path as given (resolved: write_json puts a bare name under results/)
    path = write_json(Path(args.out).resolve() if args.out else "gpu_check_smoke.json" if args.cpu_smoke else "gpu_check.json", payload)
    r = result["replay"]
    print(f"replay: T-PPO {r['tppo_speedup_per_prompt']:.2f}x, T-PPO+refill {r['tppo_refill_speedup_per_prompt']:.2f}x "
          f"PPO's prompts per second; fit {result['fit']}; {result['seconds']:.0f} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
