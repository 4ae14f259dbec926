"""The real-model path: shipped configs with a real tokenizer and chat template, GSM8K
files and datasets by name, held-out splits, train -> checkpoint -> resume -> `tppo eval`,
and (slow) the real SmolLM2-135M-Instruct GGUF checkpoint end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tppo.cli import main
from tppo.config import load_config
from tppo.evaluation import run_generate_fn
from tppo.metrics import read_metrics
from tppo.models import eos_token_ids, load_pretrained
from tppo.tasks import DatasetError, PromptSource, format_prompt, load_task_data
from tppo.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ("log.tensorboard=false", "log.progress=false", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
         "rollout.window_tokens=12", "rollout.max_response_tokens=36", "task.eval_problems=2", "algo.window_ignore_tokens=2", "log.eval_samples=1",
         "train.total_steps=1", "train.micro_batch_rows=4", "train.mini_batches=1", "task.reward_workers=0",
         "train.critic_warmup_steps=0", "log.checkpoint_every=0")


def offline_gsm8k(gsm8k, *extra) -> list[str]:
    """The overrides that run configs/gsm8k.yaml offline: local GSM8K files instead of the hub dataset."""
    train, test = gsm8k
    return ["task.name=file", f"task.train_path={train}", f"task.eval_path={test}", *extra]


def shipped_config_overrides(name: str, model_dir: str, smol_tiny_dir: str, gsm8k) -> list[str]:
    if name == "gsm8k.yaml":
        return offline_gsm8k(gsm8k, f"model.path={smol_tiny_dir}", "model.dtype=float32")
    if load_config(CONFIGS / name, ["model.path=x"]).task.name == "chain":
        return [f"model.path={model_dir}"]  # the chain configs' embedded model, without its SFT warm-start
    return [f"model.path={smol_tiny_dir}"]  # a pretrained chat model's config: SmolLM2's tokenizer


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_builds_its_first_prompt_and_runs_a_step(path, model_dir, smol_tiny_dir, gsm8k, tmp_path):
    """No shipped config points into ../shared, and each one, with small sizes (and the
    local GSM8K files for the hub dataset), builds its prompt with its real tokenizer and
    takes a step."""
    assert "shared" not in path.read_text(), f"{path.name} names a path outside the repository"
    whole = ["rollout.window_tokens=36"] if "ppo" in path.name else []  # synchronous PPO: W = L
    cfg = load_config(path, [*shipped_config_overrides(path.name, model_dir, smol_tiny_dir, gsm8k), *SMALL, *whole])
    trainer = Trainer(cfg, tmp_path)
    first = trainer.tokenizer.decode(next(trainer.source).prompt_ids)
    if path.name == "gsm8k.yaml":
        assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>assistant\n")
        assert "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>" in first
    elif cfg.task.name == "arith":
        assert first.startswith("<|im_start|>system\n") and first.endswith("<|im_start|>assistant\n")
        assert "?\nPut the final answer in \\boxed{}.<|im_end|>" in first
    else:
        assert first.endswith(":") and "{" not in first  # the chain prompt "n-d*k:" as it is
    m = trainer.step()
    assert m["policy/tokens"] == m["rollout/generated_tokens"] > 0


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_templates_replace_only_the_prompt_placeholder(path, smol_tiny_dir):
    cfg = load_config(path, ["model.path=unused"])
    _, tok = load_pretrained(smol_tiny_dir)
    for template in (cfg.task.template, 'Answer as JSON {"answer": ...} for: {prompt} in \\boxed{} or $\\frac{a}{b}$'):
        text = format_prompt(tok, "What is {x} + 1?", template)
        assert template.replace("{prompt}", "What is {x} + 1?") in text


def test_gsm8k_run_trains_checkpoints_resumes_and_tppo_eval_scores_it(smol_tiny_dir, gsm8k, tmp_path, capsys):
    """The issue's user path on a fresh clone, with a tiny model of SmolLM2's tokenizer:
    train T-PPO (W < L) -> checkpoint -> resume -> `tppo eval --model RUN/checkpoints/step-N/policy`."""
    run = tmp_path / "run"
    args = ["--config", str(CONFIGS / "gsm8k.yaml"), *offline_gsm8k(gsm8k, f"model.path={smol_tiny_dir}", "model.dtype=float32"),
            *SMALL, "train.total_steps=2", "log.checkpoint_every=1", "task.system=You are a careful solver."]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    assert main(["train", "--resume", str(run), "train.total_steps=3"]) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    ckpt = run / "checkpoints" / "step-000003" / "policy"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "chat_template.jinja").exists()
    capsys.readouterr()
    assert main(["eval", "--model", str(ckpt), "log.eval_samples=2"]) == 0
    out = capsys.readouterr().out
    assert f"config: {run / 'config.yaml'}" in out and "2 problems x 2 samples: avg@2" in out


def test_evaluation_prompts_are_built_as_training_prompts(smol_tiny_dir, gsm8k, monkeypatch):
    """The trainer's evaluation and `tppo eval` format prompts with the run's template AND
    system prompt, and stop on every EOS id: the same prompt ids as the training stream."""
    import tppo.evaluation as evaluation

    cfg = load_config(CONFIGS / "gsm8k.yaml", [*offline_gsm8k(gsm8k, f"model.path={smol_tiny_dir}", "model.dtype=float32"),
                                               *SMALL, "task.system=Be brief."])
    model, tok = load_pretrained(smol_tiny_dir)
    seen = {}

    class Recording(evaluation.EmbeddedEngine):
        def __init__(self, rollout_cfg, prompts, **kw):
            seen.update(kw, source=prompts)
            super().__init__(rollout_cfg, prompts, **kw)

    monkeypatch.setattr(evaluation, "EmbeddedEngine", Recording)
    question = "Tom has 3 apples and buys 2 more. How many apples does he have?"
    run_generate_fn(cfg, model, tok, [tok.eos_token_id, 5], "cpu")([question], 1)
    train_source = PromptSource(lambda: iter([]), tok, max_prompt_tokens=512, template=cfg.task.template, system="Be brief.")
    assert seen["source"].encode(question) == train_source.encode(question)
    assert "Be brief." in tok.decode(train_source.encode(question))
    assert seen["eos_token_ids"] == [tok.eos_token_id, 5]


def test_a_task_without_an_eval_set_holds_out_questions_removed_from_training(gsm8k, capsys):
    cfg = load_config(None, ["task.name=file", f"task.train_path={gsm8k[1]}", "model.path=unused", "task.eval_problems=20"])
    data = load_task_data(cfg.task)
    train_questions = {e.prompt for e in data.train}
    assert len(data.eval) == 20 and not train_questions & {e.prompt for e in data.eval}
    assert "20 questions" in data.notes[0] and "held out for evaluation and removed from training" in data.notes[0]
    assert load_task_data(cfg.task).eval == data.eval  # the same split every time (resume, tppo eval)
    cfg.task.eval_problems = 10**6
    with pytest.raises(DatasetError, match="cannot hold out"):
        load_task_data(cfg.task)


def test_datasets_by_name_load_through_datasets_and_fail_clearly_offline(gsm8k, tmp_path):
    """task.name: hf goes through datasets.load_dataset: here a local dataset directory
    (what a hub name resolves to once downloaded); an uncached hub name offline is a
    DatasetError naming the dataset and HF_HUB_OFFLINE."""
    (tmp_path / "ds").mkdir()
    for split, src in zip(("train", "test"), gsm8k):
        (tmp_path / "ds" / f"{split}.jsonl").write_text("".join(src.read_text().splitlines(keepends=True)[:30]))
    cfg = load_config(None, ["task.name=hf", f"task.dataset={tmp_path / 'ds'}", "task.eval_split=test", "model.path=unused"])
    data = load_task_data(cfg.task)
    assert len(data.train) == 30 and len(data.eval) == 30 and data.train[0].answer.isdigit()
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent("""
        from tppo.tasks import DatasetError, load_hf_examples
        try:
            load_hf_examples("openai/gsm8k", "train", config="main")
        except DatasetError as e:
            print("error:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "error: dataset 'openai/gsm8k' (config 'main'), split 'train' could not be loaded (HF_HUB_OFFLINE=1" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------------- the real checkpoint (slow)


@pytest.mark.slow
def test_smollm2_gguf_trains_checkpoints_resumes_and_evaluates(gsm8k, tmp_path, capsys):
    """SmolLM2-135M-Instruct from its GGUF file (dequantised at load): 2 T-PPO steps on
    GSM8K rows, a plain safetensors checkpoint, a resumed third step, `tppo eval` on it."""
    from real_models import smol_gguf_path

    gguf = smol_gguf_path()
    run = tmp_path / "run"
    args = ["--config", str(CONFIGS / "gsm8k.yaml"), *offline_gsm8k(gsm8k, f"model.path={gguf.parent}", f"model.gguf_file={gguf.name}"),
            "model.dtype=float32", *SMALL, "rollout.window_tokens=16", "rollout.max_response_tokens=48", "train.total_steps=2",
            "log.checkpoint_every=1"]
    assert main(["train", "--run-dir", str(run), *args]) == 0
    policy = run / "checkpoints" / "step-000002" / "policy"
    assert json.loads((policy / "config.json").read_text()).get("quantization_config") is None
    assert main(["train", "--resume", str(run), "train.total_steps=3"]) == 0
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "checkpoints" / "step-000003" / "policy")]) == 0
    assert "avg@1" in capsys.readouterr().out
    model, tok = load_pretrained(policy)
    assert sum(p.numel() for p in model.parameters()) > 100e6 and eos_token_ids(tok, model) == [tok.eos_token_id]


@pytest.mark.slow
def test_smollm2_gguf_with_lora_trains_resumes_exactly_evaluates_and_exports(gsm8k, tmp_path, capsys):
    """model.lora.r=8 on SmolLM2-135M-Instruct (GGUF): adapters only in the checkpoint, a
    resume equal to the uninterrupted run, `tppo eval` on the adapter checkpoint, and
    `tppo export` to a directory plain `from_pretrained` loads, its weights moved by RL."""
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from real_models import smol_gguf_path
    from trainer_helpers import deterministic_metrics

    gguf = smol_gguf_path()
    args = ["--config", str(CONFIGS / "gsm8k.yaml"), *offline_gsm8k(gsm8k, f"model.path={gguf.parent}", f"model.gguf_file={gguf.name}"),
            "model.dtype=float32", *SMALL, "rollout.window_tokens=16", "rollout.max_response_tokens=48", "log.checkpoint_every=1",
            "model.lora.r=8", "train.policy_lr=1e-3", "train.critic_warmup_steps=0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", "--run-dir", str(full), *args, "train.total_steps=3"]) == 0
    assert main(["train", "--run-dir", str(cut), *args, "train.total_steps=2"]) == 0
    step2 = cut / "checkpoints" / "step-000002"
    assert (step2 / "policy" / "adapter_model.safetensors").stat().st_size < 20e6, "adapters, not the 135M weights"
    assert main(["train", "--resume", str(cut), "train.total_steps=3"]) == 0
    # the cut run's own final evaluation at its step 2 aside, every metric of every step equal
    strip = lambda rows: [{k: v for k, v in m.items() if not (m["step"] == 2 and k.startswith("eval/"))} for m in rows]  # noqa: E731
    assert strip(deterministic_metrics(cut)) == strip(deterministic_metrics(full))
    capsys.readouterr()
    assert main(["eval", "--model", str(cut / "checkpoints" / "step-000003" / "policy")]) == 0
    assert "avg@1" in capsys.readouterr().out
    out = tmp_path / "exported"
    assert main(["export", str(cut / "checkpoints" / "step-000003"), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    base, _ = load_pretrained(f"{gguf}")
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = (exported.state_dict()[name] - base.state_dict()[name]).abs().max()
    assert 0 < moved < 0.1, "the adapters' update merged in"
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
