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
    assert "step    2/2 |" in out and "held-out accuracy (avg@1): before RL" in out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]  # 0: before RL
    # one sample per problem: the SE is the binomial one over the 2 problems, and the report quotes it
    acc = lines[0]["eval/accuracy"]
    assert lines[0]["eval/accuracy_se"] == pytest.approx((acc * (1 - acc) / 2) ** 0.5, abs=1e-12)
    assert f"before RL {acc:.3f} (SE {lines[0]['eval/accuracy_se']:.3f}) -> after RL" in out
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
    if path.name == "grpo.yaml":  # the demo's task, model, batch and policy; W = L; no critic (so none of its settings)
        differing = diff_configs(load_config(path.parent / "demo.yaml"), cfg, ignore=("log.",))
        assert sorted(differing) == ["algo.algorithm", "algo.lam_policy", "rollout.window_tokens", "train.critic_lr",
                                     "train.critic_warmup_steps"]
        assert load_config(path.parent / "demo.yaml", ["algo.algorithm=grpo"]).notes  # the demo's config serves GRPO too


# ---------------------------------------------------------------------- run directories, arguments (#22)

def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tiny_train(model_dir: str, run: Path, *extra: str) -> list[str]:
    return ["train", "--run-dir", str(run), f"model.path={model_dir}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
            "rollout.window_tokens=8", "rollout.max_response_tokens=16", "task.eval_problems=2", "log.eval_samples=1",
            "log.tensorboard=false", "log.progress=false", *extra]


def test_training_into_a_run_directory_is_refused_and_leaves_it_byte_identical(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_tiny_train(model_dir, run, "train.total_steps=3", "log.checkpoint_every=1")) == 0
    (run / "notes.txt").write_text("the user's own file")
    before = _tree(run)
    capsys.readouterr()
    assert main(_tiny_train(model_dir, run, "train.total_steps=2", "rollout.window_tokens=16")) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err and "Traceback" not in err
    assert _tree(run) == before
    # --overwrite starts again: the old run's checkpoints and metrics are gone, the user's file stays
    assert main(_tiny_train(model_dir, run, "train.total_steps=1", "--overwrite")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert load_config(run / "config.yaml").rollout.window_tokens == 8 and (run / "notes.txt").exists()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_options_and_overrides_in_any_order():
    from tppo.cli import parse_args

    args = parse_args(["train", "--config", "c.yaml", "a.b=1", "--run-dir", "d", "c.d=2", "--overwrite"])
    assert (args.cmd, args.config, args.run_dir, args.overwrite, args.overrides) == ("train", "c.yaml", "d", True, ["a.b=1", "c.d=2"])
    args = parse_args(["eval", "x.y=1", "--model", "m", "z.w=2"])
    assert (args.cmd, args.model, args.overrides) == ("eval", "m", ["x.y=1", "z.w=2"])
    args = parse_args(["plot", "r1", "--out", "o.png", "r2"])
    assert (args.runs, args.out) == (["r1", "r2"], "o.png")
    with pytest.raises(SystemExit):
        parse_args(["trian"])


def test_an_option_between_overrides_trains(model_dir, tmp_path):
    run = tmp_path / "run"
    argv = _tiny_train(model_dir, run, "train.total_steps=1")
    argv = [argv[0], *argv[3:6], "--run-dir", str(run), *argv[6:]]  # the option in the middle
    assert main(argv) == 0 and (run / "checkpoints" / "step-000001").is_dir()


def test_config_command_prints_the_resolved_documented_yaml(capsys):
    import yaml

    from tppo.config import to_dict

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert main(["config", "--config", str(configs / "demo.yaml"), "rollout.window_tokens=32"]) == 0
    out = capsys.readouterr().out
    assert "  window_tokens: 32  # W, new tokens a row may generate per step." in out
    assert yaml.safe_load(out) == to_dict(load_config(configs / "demo.yaml", ["rollout.window_tokens=32"]))
    assert main(["config", "algo.algorithm=grpo"]) == 0 and "# note: algo.algorithm grpo generates whole responses" in capsys.readouterr().out


def test_dry_run_checks_everything_offline_and_loads_no_weights(gsm8k, smol_tiny_dir, tmp_path, monkeypatch, capsys):
    """configs/gsm8k.yaml with local files: exit 0 without network, weights never loaded,
    nothing written; with a tokenizer on disk the first prompt is shown as the model sees it."""
    import transformers

    def no_weights(*args, **kwargs):
        raise AssertionError("the dry run loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, test = gsm8k
    gsm = str(Path(__file__).resolve().parents[1] / "configs" / "gsm8k.yaml")
    files = ["task.name=file", f"task.train_path={train}", f"task.eval_path={test}"]
    run = tmp_path / "run"
    assert main(["train", "--config", gsm, "--dry-run", "--run-dir", str(run), *files]) == 0
    out = capsys.readouterr().out
    assert "hub id Qwen/Qwen2.5-0.5B-Instruct" in out and "reward: math" in out and "512 slots = 64 prompts x 8 samples" in out
    assert not run.exists()
    assert main(["train", "--config", gsm, "--dry-run", "--run-dir", str(run), *files, f"model.path={smol_tiny_dir}"]) == 0
    out = capsys.readouterr().out
    assert "as the model sees it:" in out and "<|im_start|>user" in out and "Please reason step by step" in out
    # a reward that does not exist, a missing local model: the errors a run would meet, at once
    assert main(["train", "--config", gsm, "--dry-run", *files, "model.path=./models/typo"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_samples_are_logged_with_their_fields_and_the_console_shows_them(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = _tiny_train(model_dir, run, "train.total_steps=2", "log.eval_every=1", "log.samples=2", "log.samples_every=1",
                       "log.tensorboard=true", "log.progress=true")
    assert main([argv[0], *argv[3:5], "--run-dir", str(run), *argv[5:]]) == 0  # the option in the middle
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {tuple(sorted(r)) for r in rows} == {("completion", "finished", "prompt", "reward", "split", "step", "windows")}
    assert [(r["step"], r["split"]) for r in rows] == [(0, "eval")] * 2 + [(1, "train")] * 2 + [(1, "eval")] * 2 + [(2, "train")] * 2 + [(2, "eval")] * 2
    assert all(r["prompt"] and isinstance(r["completion"], str) for r in rows)
    assert all((r["reward"] is None) == (not r["finished"]) for r in rows)
    out = capsys.readouterr().out
    assert out.count("sample (eval):") == 3 and "step    2/2 |" in out and " nan" not in out
    assert out.count("evaluating 2 problems x 1 samples") == 3  # no silent evaluation in a log file
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 0 and "eval/accuracy" in lines[0] and lines[1]["eval/k"] == 1 and "eval/pass@k" in lines[1]
    assert lines[1]["train/policy_lr"] > 0


def test_a_mistyped_model_path_fails_at_once_naming_it(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []

    def no_such_model(repo, **kwargs):
        calls.append(repo)
        raise OSError("404 Repository Not Found")

    monkeypatch.setattr(huggingface_hub, "model_info", no_such_model)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--run-dir", str(tmp_path / "r"), "model.path=models/smolm2", "task.name=arith"]) == 2
    err = capsys.readouterr().err
    assert "no local directory models/smolm2 (models/ exists: a typo?)" in err and "hub has no such model" in err and calls == ["models/smolm2"]
    assert main(["eval", "--model", "./models/typo"]) == 2 and "does not exist" in capsys.readouterr().err


def test_eval_needs_only_the_model_and_the_evaluation_file(model_dir, gsm8k, tmp_path, capsys):
    _, test = gsm8k
    assert main(["eval", "--model", model_dir, "task.name=file", f"task.eval_path={test}", "task.eval_problems=3", "log.eval_samples=1",
                 "rollout.max_response_tokens=8", "rollout.window_tokens=8", "task.reward=math"]) == 0
    assert "3 problems x 1 samples" in capsys.readouterr().out
    assert main(["train", "--run-dir", str(tmp_path / "r"), f"model.path={model_dir}", "task.name=file", f"task.eval_path={test}"]) == 2
    assert "training needs training data: task.train_path" in capsys.readouterr().err


def test_plot_labels_every_panel_and_refuses_a_missing_run(model_dir, tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    from tppo import plots

    run = tmp_path / "run"
    assert main(_tiny_train(model_dir, run, "train.total_steps=1")) == 0  # one step: most series have one point
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, dpi, layout=True: saved.append(fig) or Path(out))
    plots.plot_runs([run], tmp_path / "p.png")
    (fig,) = saved
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.legends) == 1
    axes = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(axes) == len(plots.PANELS) and all(ax.get_ylabel() for ax in axes)
    notes = [t.get_text() for ax in axes for t in ax.texts]
    assert any(n == "fewer than 2 points: run" for n in notes)
    assert any("rolling mean" in t.get_text() for t in fig.texts)
    assert main(["plot", str(tmp_path / "nope")]) == 2 and "not a run directory" in capsys.readouterr().err


def test_a_terminal_gets_a_live_bar_and_a_log_gets_a_line_per_step(model_dir, tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setattr(sys, "stderr", term)
    assert main(_tiny_train(model_dir, tmp_path / "run", "train.total_steps=3", "log.progress=true")) == 0
    out = term.getvalue()
    assert "training" in out and "3/3" in out and "reward " in out  # the bar, its status the step's values
    assert "step    1/3 |" not in out and "step    3/3 |" in out  # lines only for the steps that evaluated


def test_the_demo_run_twice_shows_its_run_and_overwrite_trains_it_again(model_dir, tmp_path, capsys):
    from tppo.config import save_config
    from trainer_helpers import make_cfg

    save_config(make_cfg(model_dir, tmp_path / "demo", "train.total_steps=2", "log.checkpoint_every=1"), tmp_path / "demo.yaml")
    assert main(["demo", "--config", str(tmp_path / "demo.yaml")]) == 0
    before = (tmp_path / "demo" / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["demo", "--config", str(tmp_path / "demo.yaml")]) == 0  # the README's command, again
    out = capsys.readouterr().out
    assert "holds the demo's run: continuing it" in out and "held-out accuracy (avg@2): before RL" in out
    assert (tmp_path / "demo" / "metrics.jsonl").read_bytes() == before  # finished: nothing trained again
    assert main(["demo", "--config", str(tmp_path / "demo.yaml"), "rollout.window_tokens=4"]) == 2  # another config: refused
    assert "tppo demo --overwrite" in capsys.readouterr().err
    assert main(["demo", "--config", str(tmp_path / "demo.yaml"), "--overwrite"]) == 0


def test_summary_line_quotes_the_evaluation_with_its_standard_error():
    from tppo.metrics import summary_line

    m = {"step": 3, "eval/accuracy": 0.4521, "eval/accuracy_se": 0.0214}
    assert summary_line(m).endswith("| eval acc 0.452 (SE 0.021)")
    assert summary_line({**m, "eval/accuracy_se": float("nan")}).endswith("| eval acc 0.452 (SE -)")  # one problem: undefined
    assert summary_line({"step": 3, "eval/accuracy": 0.4521}).endswith("| eval acc 0.452")  # a run from before the SE
    assert "eval acc" not in summary_line({"step": 3})


def test_summary_line_shows_the_behaviour_kl_not_the_one_pass_approx_kl():
    """With one update per step ``policy/approx_kl`` is 0 by construction; the console's KL
    is the trained tokens' KL from the policies that sampled them (rollout/mismatch_kl)."""
    from tppo.metrics import summary_line

    line = summary_line({"step": 3, "policy/approx_kl": 0.0, "rollout/mismatch_kl": 3.1e-4})
    assert " kl(mu) 3.1e-04 " in line and "0.0e+00" not in line
    assert " kl(mu) - " in summary_line({"step": 3, "policy/approx_kl": 0.0})  # an engine-logprob run: pi_old is mu
