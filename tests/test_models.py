"""Loading models: local directories, hub ids (offline, from the cache), GGUF sources,
dropout off, every EOS id; `tppo convert`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tppo.models import ModelSource, ModelSourceError, build_tiny, disable_dropout, eos_token_ids, load_pretrained, save_pretrained
from trainer_helpers import TINY


def fake_hub_cache(home: Path, repo: str, model_dir: str) -> None:
    """Put a saved model into a Hugging Face cache under ``home`` the way a download does
    (hub/models--owner--name/refs/main -> snapshots/<commit>/files)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(model_dir).iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def run_offline(home: Path, code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with HF_HOME=home and HF_HUB_OFFLINE=1 (the hub's
    settings are read at import, so they cannot be changed inside this process)."""
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300)


def test_hub_id_resolves_from_the_cache_offline_and_an_uncached_one_is_a_clear_error(model_dir, tmp_path):
    fake_hub_cache(tmp_path, "tppo-test/tiny", model_dir)
    proc = run_offline(tmp_path, """
        from tppo.models import ModelSourceError, load_pretrained
        model, tok = load_pretrained("tppo-test/tiny")
        print("loaded", type(model).__name__, len(tok))
        try:
            load_pretrained("tppo-test/not-cached")
        except ModelSourceError as e:
            print("error:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded LlamaForCausalLM" in proc.stdout
    assert "error: model 'tppo-test/not-cached' is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1" in proc.stdout


def test_sources_that_cannot_be_models_are_named(tmp_path):
    with pytest.raises(ModelSourceError, match="model directory ./nowhere/model does not exist"):
        load_pretrained("./nowhere/model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is a file, not a checkpoint directory"):
        load_pretrained(tmp_path / "weights.bin")
    with pytest.raises(ModelSourceError, match="has no GGUF file missing.gguf"):
        load_pretrained(ModelSource.of(tmp_path, gguf_file="missing.gguf"))


def test_a_gguf_file_path_is_its_directory_and_file_name(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert ModelSource.of(tmp_path / "m.gguf") == ModelSource(str(tmp_path), "m.gguf", None)
    with pytest.raises(ModelSourceError, match="names another"):
        ModelSource.of(tmp_path / "m.gguf", gguf_file="other.gguf")
    assert ModelSource.of("Qwen/Qwen2.5-0.5B", revision="v1").kwargs() == {"revision": "v1"}


def test_gguf_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    import importlib.util

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs the 'gguf' package: pip install 'tppo\[gguf\]'"):
        load_pretrained(tmp_path / "m.gguf")


def test_dropout_is_off_after_load_so_train_mode_is_deterministic(tmp_path):
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
    _, tok = build_tiny(TINY)
    save_pretrained(GPT2LMHeadModel(config), tok, tmp_path)
    model, _ = load_pretrained(tmp_path)
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.train()
    ids = torch.randint(4, 64, (2, 12))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
    with_dropout = GPT2LMHeadModel(config).train()
    assert not torch.equal(with_dropout(ids).logits, with_dropout(ids).logits)  # the guard: dropout was really on
    assert disable_dropout(with_dropout) is with_dropout and torch.equal(with_dropout(ids).logits, with_dropout(ids).logits)


def test_eos_ids_are_the_tokenizer_s_and_the_generation_config_s(model_dir):
    model, tok = load_pretrained(model_dir)
    assert eos_token_ids(tok, model) == [tok.eos_token_id]
    model.generation_config.eos_token_id = [tok.eos_token_id, 7, 9]
    assert eos_token_ids(tok, model) == sorted({tok.eos_token_id, 7, 9})


def test_smol_gguf_tokenizer_loads_with_its_chat_template_and_eos(smol_tiny_dir):
    model, tok = load_pretrained(smol_tiny_dir)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and eos_token_ids(tok, model) == [tok.eos_token_id]
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
