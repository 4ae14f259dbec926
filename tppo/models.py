"""Building and loading policy models and tokenizers.

Two ways in, one code path out: a real Hugging Face checkpoint from a local directory
(:func:`load_pretrained`), or the embedded default built in code (:func:`build_tiny`):
a tiny Llama-architecture ``LlamaForCausalLM`` and a character-level tokenizer made
with the ``tokenizers`` library and wrapped as a transformers fast tokenizer. Both are
saved with ``save_pretrained`` (safetensors) and reloaded with the same
:func:`load_pretrained`, so the rollout engine and the trainer never special-case the
embedded model.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tppo.config import TinyModelConfig
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# Printable ASCII without the other whitespace: every character of the embedded
# task (digits, operators, words) is one token, so response lengths in tokens are
# response lengths in characters and the length tail is easy to control.
TINY_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_tiny_tokenizer(alphabet: str = TINY_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character of ``alphabet`` plus
    ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3)."""
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # "." may not match a newline; "isolated" keeps unmatched text as its own piece anyway.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK)


def build_tiny(spec: TinyModelConfig | None = None, seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """The embedded default: a randomly initialised tiny Llama and its tokenizer."""
    spec = spec or TinyModelConfig()
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **dataclasses.asdict(spec),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None, **kwargs) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory (offline).

    ``kwargs`` go to both ``from_pretrained`` calls (e.g. ``gguf_file=...``). The
    tokenizer must know its EOS token: generation stops on it and rewards sit on it.
    A missing pad token falls back to EOS, the usual choice for decoder-only models.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist (tppo loads checkpoints from local files)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model_kwargs = dict(kwargs)
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **model_kwargs)
    return model, tokenizer


def critic_from_policy(policy: torch.nn.Module) -> torch.nn.Module:
    """A critic: the policy's backbone weights under a fresh scalar head.

    It is the token-classification model of the policy's architecture with one label
    (as in OpenRLHF and TRL), so it saves and loads with ``save_pretrained`` /
    :func:`load_critic` like any checkpoint. Its output at position p is V(s) for the
    state ending with token p. Dropout is off: value targets must be deterministic.
    """
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    config.classifier_dropout = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        critic = AutoModelForTokenClassification.from_config(config)
    missing, unexpected = critic.base_model.load_state_dict(policy.base_model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"critic backbone does not match the policy's: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return critic.to(device=next(policy.parameters()).device, dtype=next(policy.parameters()).dtype)


def load_critic(path: str | Path, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A critic saved by ``save_pretrained`` (a token-classification model, one label)."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    critic = AutoModelForTokenClassification.from_pretrained(path, local_files_only=True, num_labels=1, **kwargs)
    if critic.config.num_labels != 1:
        raise ValueError(f"critic checkpoint {path} has {critic.config.num_labels} labels; a critic has 1")
    return critic


def own_aligned_memory(model: torch.nn.Module) -> torch.nn.Module:
    """Copy CPU parameters and buffers that sit at unaligned addresses into fresh memory.

    Weights loaded from safetensors live in a memory map at the file's offsets, which are
    not 64-byte aligned; CPU kernels take other vectorisation paths on unaligned data and
    round differently in the last bit. The same weights built in memory and loaded from a
    checkpoint would then give different gradients, and a resumed run would drift from
    the uninterrupted one (tests/test_reliability.py found this). Fresh allocations are
    64-byte aligned. Tied weights are one Parameter, so they stay tied.
    """
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.device.type == "cpu" and t.data_ptr() % 64:
                t.data = t.data.clone()
    return model


def save_pretrained(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save model (safetensors) and tokenizer side by side in ``path``; ``state_dict``
    replaces the model's own (the gathered full weights of a sharded model)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def num_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
