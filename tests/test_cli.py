"""The command line: train + plot end to end, errors as messages with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tppo.cli import main
from tppo.config import TinyModelConfig, diff_configs, load_config
from tppo.models import build_tiny, save_pretrained


def test_train_then_plot(tmp_path, capsys):
    model, tok = build_tiny(TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    save_pretrained(model, tok, tmp_path / "m")
    run = tmp_path / "run"
    code = main(["train", "--run-dir", str(run), f"model.path={tmp_path / 'm'}", "train.total_steps=2", "rollout.prompts_per_step=2",
                 "rollout.samples_per_prompt=2", "rollout.window_tokens=8", "rollout.max_response_tokens=16",
                 "task.eval_problems=2", "log.eval_samples=1", "log.tensorboard=false"])
    assert code == 0
    out = capsys.readouterr().out
    assert "step    2 |" in out and "held-out accuracy (avg@1): before RL" in out
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert (run / "plots.png").stat().st_size > 10_000
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").exists()


def test_bad_override_is_a_clear_error(capsys):
    assert main(["train", "rollout.windw_tokens=3"]) == 2
    assert "unknown config key 'rollout.windw_tokens'" in capsys.readouterr().err


def test_vllm_engine_without_vllm_is_a_clear_error(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    from trainer_helpers import save_tiny

    code = main(["train", "--run-dir", str(tmp_path / "run"), f"model.path={save_tiny(tmp_path / 'm')}", "rollout.engine=vllm",
                 "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2", "task.eval_problems=2", "log.tensorboard=false"])
    assert code == 2 and "pip install 'tppo[vllm]'" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_pair_up(path):
    """Every config in configs/ loads (no stale key after a rename); the PPO baseline
    differs from the demo only where the algorithm does."""
    needs_model = path.name == "gsm8k.yaml"  # a real-model config: model.path is the user's
    cfg = load_config(path, ["model.path=/models/any"] if needs_model else [])
    if path.name == "ppo.yaml":
        demo = load_config(path.parent / "demo.yaml")
        differing = diff_configs(demo, cfg, ignore=("log.",))
        assert sorted(differing) == ["algo.algorithm", "rollout.window_tokens"]
        assert cfg.algo.algorithm == "ppo" and cfg.rollout.window_tokens == cfg.rollout.max_response_tokens
