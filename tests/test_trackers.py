"""Trackers beside metrics.jsonl (#22): W&B offline and MLflow's file store get the same
metrics at the same steps, the config as parameters, the samples as tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tppo.cli import main
from tppo.trackers import mlflow_name

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_history(path: Path) -> list[dict]:
    """The history records of an offline W&B run file (``run-ID.wandb``): a 7-byte header
    (":W&B", magic 0xBEE1, version), then LevelDB-log records (crc32, length, type) in
    32 KiB blocks, each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            if rec.WhichOneof("record_type") == "history":
                out.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
            elif rec.WhichOneof("record_type") == "metric":
                out.append({"_metric": rec.metric.glob_name or rec.metric.name, "_step_metric": rec.metric.step_metric})
    return out


def numeric(m: dict) -> dict:
    return {k: v for k, v in m.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def test_wandb_offline_and_mlflow_file_store_get_the_metrics_of_metrics_jsonl(model_dir, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), f"model.path={model_dir}", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
                 "rollout.window_tokens=8", "rollout.max_response_tokens=16", "task.eval_problems=2", "log.eval_samples=1",
                 "train.total_steps=2", "log.progress=false", "log.report_to=[tensorboard,wandb,mlflow]", "log.project=unit"]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1, 2]
    # MLflow: every finite metric at every step, under its name ('@' spelled _at_), the config as parameters
    client = MlflowClient((run / "trackers" / "mlruns").resolve().as_uri())
    run_id = (run / "trackers" / "mlflow_run_id").read_text()
    for key in set().union(*(numeric(m) for m in lines)):
        history = {h.step: h.value for h in client.get_metric_history(run_id, mlflow_name(key))}
        assert history == {m["step"]: pytest.approx(float(m[key])) for m in lines if key in numeric(m)}, key
    assert client.get_run(run_id).data.params["rollout.window_tokens"] == "8"
    # W&B offline: the history records hold the same values at the same steps
    (wandb_file,) = (run / "trackers" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_history(wandb_file)
    assert {"_metric": "*", "_step_metric": "step"} in records, "charts against the trainer's step, not W&B's call count"
    history: dict[int, dict] = {}
    for h in records:
        if "step" in h:
            history.setdefault(h["step"], {}).update(h)
    for m in lines:
        got = history[m["step"]]
        assert {k: got[k] for k in numeric(m)} == pytest.approx(numeric(m)), m["step"]
    tables = [h["samples/eval/_type"] for h in records if "samples/eval/_type" in h]
    assert tables == ["table-file", "table-file"], "the samples of the two evaluations, as W&B tables"


def test_a_missing_tracker_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "--run-dir", str(tmp_path / "r"), "log.report_to=[wandb]"]) == 2
    assert "pip install 'tppo[wandb]'" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert main(["train", "log.report_to=[neptune]"]) == 2
    assert "log.report_to" in capsys.readouterr().err
