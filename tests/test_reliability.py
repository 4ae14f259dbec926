"""Reliability promises (docs/reliability.md): non-finite updates are skipped and
counted and stop the run after N in a row; a failed or killed checkpoint write leaves
the previous one loadable; bad models are refused with a named reason; carried rows are
bounded; SIGKILL at random points followed by resume equals an uninterrupted run."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trainer_helpers import make_cfg, params

import tppo.algos
from tppo.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state
from tppo.config import Config, ConfigError, RolloutConfig, load_config
from tppo.metrics import read_metrics
from tppo.models import build_tiny, critic_from_policy, load_pretrained
from tppo.rollout import EmbeddedEngine, PromptItem
from tppo.tasks import DatasetError, load_examples
from tppo.trainer import CheckpointError, Trainer, TrainingDiverged

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import soak  # noqa: E402  (the kill harness, shared with the long soak script)


def nan_policy_loss(monkeypatch, steps_with_nan: set[int], trainer_ref: list):
    """Make the policy loss NaN on the given (1-based) steps."""
    real = tppo.algos.policy_loss

    def fake(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        if trainer_ref[0].step_idx + 1 in steps_with_nan:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(tppo.algos, "policy_loss", fake)


def test_nonfinite_loss_skips_the_update_keeps_weights_and_counts(model_dir, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=3"), tmp_path)
    nan_policy_loss(monkeypatch, {1, 2}, [trainer])
    before = params(trainer.policy)
    m1, m2 = trainer.step(), trainer.step()
    assert all(torch.equal(v, params(trainer.policy)[k]) for k, v in before.items()), "a NaN step must not move the weights"
    assert not trainer.policy_opt.state, "nor Adam's moments"
    assert (m1["policy/skipped_steps"], m1["train/nonfinite_skips"], m2["train/nonfinite_skips"]) == (1, 1, 2)
    assert m1["value/skipped_steps"] == 0, "the critic's loss was finite: it still trains"
    m3 = trainer.step()  # finite again: the update happens and the streak resets
    assert m3["policy/skipped_steps"] == 0 and trainer.nonfinite_in_a_row == 0 and m3["train/nonfinite_skips"] == 2
    assert any(not torch.equal(v, params(trainer.policy)[k]) for k, v in before.items())
    trainer.scorer.close()


def test_run_stops_after_n_nonfinite_steps_in_a_row(model_dir, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=6", "train.max_nonfinite_steps=2"), tmp_path)
    nan_policy_loss(monkeypatch, set(range(1, 7)), [trainer])
    with pytest.raises(TrainingDiverged, match=r"step 2: 2 steps in a row had a NaN/inf loss or gradient"):
        trainer.train()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2], "the failing steps are still logged"


def test_failed_checkpoint_write_keeps_the_previous_one(model_dir, tmp_path, monkeypatch):
    trainer = Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=3", "log.checkpoint_every=1", "log.keep_checkpoints=2"), tmp_path)
    trainer.step(), trainer.step()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("tppo.checkpoint.torch.save", disk_full)
    with pytest.raises(CheckpointError, match=r"step 3 not written .*No space left.*step-000002 is intact"):
        trainer.step()
    monkeypatch.undo()
    trainer.scorer.close()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")), "the half-written directory is removed"
    resumed = Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=3", "log.checkpoint_every=1"), tmp_path, resume=True)
    assert resumed.step_idx == 2
    resumed.scorer.close()


def test_a_save_killed_midway_is_invisible_and_cleaned_up(model_dir, tmp_path):
    trainer = Trainer(make_cfg(model_dir, tmp_path, "train.total_steps=2", "log.checkpoint_every=1"), tmp_path)
    trainer.step()
    # What SIGKILL during a save leaves: a temporary directory with part of a checkpoint;
    # during the pruning of an old one: that one half deleted, already renamed away.
    stale = tmp_path / "checkpoints" / ".tmp-step-000002-99999"
    pruned = tmp_path / "checkpoints" / ".del-step-000000-99999"
    for d in (stale, pruned):
        (d / "policy").mkdir(parents=True)
        (d / "policy" / "model.safetensors").write_bytes(b"\x00" * 10)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"]
    load_trainer_state(latest_checkpoint(tmp_path))
    trainer.step()  # the next save removes both
    assert not stale.exists() and not pruned.exists() and latest_checkpoint(tmp_path).name == "step-000002"
    trainer.scorer.close()


def test_tokenizer_without_eos_is_refused(tmp_path):
    model, tok = build_tiny(seed=0)
    tok.eos_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no EOS token"):
        load_pretrained(tmp_path)


def test_critic_from_another_model_is_refused(model_dir, tmp_path):
    policy, _ = load_pretrained(model_dir)
    policy.resize_token_embeddings(policy.config.vocab_size + 8)  # "another model": a different vocabulary
    critic_from_policy(policy).save_pretrained(tmp_path / "critic")
    with pytest.raises(ValueError, match=r"vocabulary of \d+ tokens but the policy .* has \d+"):
        Trainer(make_cfg(model_dir, tmp_path / "run", f"model.critic_path={tmp_path / 'critic'}"), tmp_path / "run")


def test_a_response_spans_at_most_ceil_L_over_W_windows(model_dir):
    """Carried rows cannot pile up: with EOS ignored every response runs to the cap L,
    so each spans exactly ceil(L / W) windows, and the carried set never exceeds the slots."""
    model, _ = load_pretrained(model_dir)
    cfg = RolloutConfig(prompts_per_step=3, samples_per_prompt=2, window_tokens=5, max_response_tokens=17, ignore_eos=True)
    prompts = iter([PromptItem(i, [5 + i, 6, 7], meta={}) for i in range(12)])
    engine = EmbeddedEngine(cfg, prompts, eos_token_ids=0, pad_token_id=0)
    finished = 0
    for version in range(20):
        wb = engine.generate_window(model, version)
        if not wb.rows:
            break
        assert len(engine.carried) <= cfg.num_slots
        for row in wb.rows:
            assert row.windows <= math.ceil(17 / 5) and len(row.response_ids) <= 17
            finished += row.finished
            if row.finished:
                assert row.windows == 4 and row.finish_reason == "length"
    assert finished == 12 * 2


# ---------------------------------------------------------------------- SIGKILL and resume


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    """The kill harness of benchmarks/soak.py (which runs it longer): 3 random SIGKILLs."""
    total = 8
    cfg_path = soak.small_config(tmp_path, total)
    clean = subprocess.run(soak.train_cmd(cfg_path, tmp_path / "clean", False), capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "0"})
    assert clean.returncode == 0, clean.stderr[-2000:]
    landed = soak.run_with_kills(cfg_path, tmp_path / "killed", total, kills=3, seed=1)
    assert landed >= 2, f"only {landed} kills landed while the run was alive"
    soak.compare_runs(tmp_path / "clean", tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == total


# ---------------------------------------------------------------------- fuzzing bad input

def _containers(inner):
    return st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3))


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20), _containers,
                            max_leaves=6)
_rows = st.one_of(
    st.fixed_dictionaries({"question": st.text(max_size=30), "answer": st.text(max_size=30)}),  # maybe empty, maybe no ####
    st.dictionaries(st.sampled_from(["question", "answer", "other"]), _json_values, max_size=3),
    _json_values,
)
_jsonl_lines = st.lists(st.one_of(_rows.map(lambda r: json.dumps(r).encode()),
                            st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
                            st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t).map(str.encode)),
                  max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=_jsonl_lines)
def test_fuzzed_jsonl_is_loaded_or_refused_by_line_never_crashes(tmp_path, lines):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows = sum(1 for raw in path.read_bytes().split(b"\n") if raw.decode("utf-8", "replace").strip())
    try:
        load_examples(path, answer_format="gsm8k")
    except DatasetError as e:
        assert str(path) in str(e) and ":" in str(e)
    loaded = load_examples(path, answer_format="gsm8k", skip_bad_rows=True)
    # Nothing silently lost: every non-blank line is an example or a counted skip.
    assert len(loaded.examples) + len(loaded.skipped) == rows


_KEYS = [f"{section}.{f.name}" for section in ("rollout", "algo", "train", "task", "log", "model", "sft")
         for f in dataclasses.fields(type(getattr(Config(), section)))] + ["bogus.key", "rollout", "train.", ".x", "task.chain.sigma"]
_VALUES = st.one_of(st.integers(-3, 600).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                    st.sampled_from(["true", "null", "[1, 2]", "{a: 1}", "tppo", "ppo", "'", "[1,", "{", "adaptive", "-", "1e-3", ""]),
                    st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(overrides=st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES).map("=".join), max_size=4))
def test_fuzzed_overrides_give_a_config_or_a_config_error(overrides):
    try:
        assert isinstance(load_config(None, overrides), Config)
    except ConfigError as e:
        assert str(e)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["rollout: {window_tokens: 9999}", "[1]: 2", "rollout:\n  x: 1\n  x: 2", "- a\n- b",
                                       "train: 5", "rollout: {window_tokens: 64}\nrollout: {}", "? [a]\n: 1"])))
def test_fuzzed_yaml_files_give_a_config_or_a_config_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e)


def test_non_utf8_config_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"rollout:\n  window_tokens: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"c.yaml: not valid UTF-8"):
        load_config(path)


def test_loaded_weights_are_moved_to_aligned_memory_unchanged(model_dir):
    from tppo.models import own_aligned_memory

    model, _ = load_pretrained(model_dir)
    before = params(model)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    own_aligned_memory(model)
    assert all(t.data_ptr() % 64 == 0 for t in [*model.parameters(), *model.buffers()])
    assert all(torch.equal(v, params(model)[k]) for k, v in before.items())
    assert (model.get_input_embeddings().weight is model.get_output_embeddings().weight) == tied


# ---------------------------------------------------------------------- SIGINT / SIGTERM: stop, save, resume (#22)


def _sigint_as_in_a_terminal():
    """Children get SIGINT as a terminal's foreground process has it, even when the tests
    run as a background job (which ignores SIGINT, and tppo leaves an ignored signal alone)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_stop_signal_ends_the_step_saves_and_resume_equals_an_uninterrupted_run(model_dir, tmp_path):
    """In-process: SIGINT during step 2 of 4 (no checkpoint due before the end) stops after
    step 2 with a checkpoint; resuming it reproduces the uninterrupted run exactly."""
    import signal

    from tppo.stopping import Interrupted
    from tppo.trainer import resume_config
    from trainer_helpers import deterministic_metrics

    common = ("train.total_steps=4", "log.checkpoint_every=0", "log.eval_every=2")
    Trainer(make_cfg(model_dir, tmp_path / "full", *common), tmp_path / "full").train()
    cut = Trainer(make_cfg(model_dir, tmp_path / "cut", *common), tmp_path / "cut")
    real_step = cut.step

    def step_then_signal():
        m = real_step()
        if m["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the handler before the next bytecode
        return m

    cut.step = step_then_signal
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
    try:
        with pytest.raises(Interrupted) as stop:
            cut.train()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is restored"
    finally:
        signal.signal(signal.SIGINT, before)
    assert (stop.value.step, stop.value.exit_code) == (2, 130)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step-000002"]
    resumed = Trainer(resume_config(tmp_path / "cut", make_cfg(model_dir, tmp_path / "cut", *common)), tmp_path / "cut", resume=True)
    assert resumed.engine.carried, "rows in flight are in the stop's checkpoint"
    resumed.train()
    assert deterministic_metrics(tmp_path / "cut") == deterministic_metrics(tmp_path / "full")


def test_ctrl_c_on_the_command_line_exits_130_without_a_traceback_and_resumes_exactly(tmp_path):
    import signal
    import time

    total = 6
    cfg_path = soak.small_config(tmp_path, total)  # checkpoints every step
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    clean = subprocess.run(soak.train_cmd(cfg_path, tmp_path / "clean", False), capture_output=True, text=True, env=env)
    assert clean.returncode == 0, clean.stderr[-2000:]
    run = tmp_path / "cut"
    proc = subprocess.Popen(soak.train_cmd(cfg_path, run, False), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_sigint_as_in_a_terminal)
    deadline = time.monotonic() + 120
    while soak.logged_steps(run) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"tppo train --resume {run}" in err, err
    saved = int(latest_checkpoint(run).name.split("-")[1])
    assert 2 <= saved < total and saved == soak.logged_steps(run), "stopped within one step, the last logged one saved"
    resumed = subprocess.run(soak.train_cmd(cfg_path, run, True), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    soak.compare_runs(tmp_path / "clean", run)
