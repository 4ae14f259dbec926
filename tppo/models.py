"""Building and loading policy models and tokenizers.

Two ways in, one code path out: a real Hugging Face checkpoint from a local directory, a
hub id or a GGUF file (:func:`load_pretrained`), or the embedded default built in code (:func:`build_tiny`):
a tiny Llama-architecture ``LlamaForCausalLM`` and a character-level tokenizer made
with the ``tokenizers`` library and wrapped as a transformers fast tokenizer. Both are
saved with ``save_pretrained`` (safetensors) and reloaded with the same
:func:`load_pretrained`, so the rollout engine and the trainer never special-case the
embedded model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import itertools
import re
import string
from pathlib import Path

import huggingface_hub
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from tppo.config import TinyModelConfig
from tppo.lora import is_lora, unwrap  # a LoRA wrapper passes the forward's arguments through unnamed
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


class ModelSourceError(FileNotFoundError):
    """A model source could not be resolved (not a directory, not a reachable hub model)."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a checkpoint comes from: a local directory or a Hugging Face hub id (``repo``),
    with an optional GGUF file inside it and a hub ``revision`` (branch, tag or commit)."""

    repo: str
    gguf_file: str | None = None
    revision: str | None = None

    @classmethod
    def of(cls, path: str | Path, gguf_file: str | None = None, revision: str | None = None) -> "ModelSource":
        """``path`` may also be a ``.gguf`` file itself (its directory and file name)."""
        p = Path(path).expanduser()
        if p.suffix == ".gguf" and p.is_file():
            if gguf_file not in (None, p.name):
                raise ModelSourceError(f"model path {p} is a GGUF file but gguf_file names another: {gguf_file}")
            return cls(str(p.parent), p.name, revision)
        return cls(str(p) if p.exists() else str(path), gguf_file, revision)

    @property
    def is_local(self) -> bool:
        return Path(self.repo).is_dir()

    def resolved(self) -> "ModelSource":
        """The same source with a local directory as an absolute path (readable from anywhere)."""
        return dataclasses.replace(self, repo=str(Path(self.repo).resolve())) if self.is_local else self

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    def kwargs(self) -> dict[str, str]:
        """Keyword arguments of ``from_pretrained`` for this source."""
        out = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return out | ({"revision": self.revision} if self.revision and not self.is_local else {})


# A hub id: "name" or "owner/name" of letters, digits, "-", "_", "." (huggingface_hub's rule).
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def check_source(src: ModelSource, probe_hub: bool = True) -> None:
    """Fail early, with the reason, on what from_pretrained would report obscurely (with
    ``probe_hub``, a hub id not in the cache is looked up on the hub: :func:`_probe_hub`)."""
    if src.is_local:
        if src.gguf_file and not (Path(src.repo) / src.gguf_file).is_file():
            raise ModelSourceError(f"model directory {src.repo} has no GGUF file {src.gguf_file}")
    elif Path(src.repo).exists():
        raise ModelSourceError(f"model path {src.repo} is a file, not a checkpoint directory (a .gguf file is accepted as it is)")
    elif not _HUB_ID.fullmatch(src.repo) or src.repo.startswith((".", "/", "~")):
        raise ModelSourceError(f"model directory {src.repo} does not exist (and it is not a Hugging Face hub id like 'owner/name')")
    elif probe_hub:
        _probe_hub(src)
    if src.gguf_file:
        for module in ("gguf", "accelerate"):
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"loading the GGUF file {src.gguf_file} needs the '{module}' package: pip install 'tppo[gguf]'")


def _probe_hub(src: ModelSource) -> None:
    """A hub id not in the local cache is looked up once on the hub, quickly, before
    from_pretrained's retries: ``models/typo`` (a local path mistyped, or an unknown hub
    model) fails in seconds with both possibilities named. Offline mode is left to
    from_pretrained, which reads the cache and says so."""
    if huggingface_hub.is_offline_mode():
        return
    if isinstance(huggingface_hub.try_to_load_from_cache(src.repo, src.gguf_file or "config.json", revision=src.revision), str):
        return
    try:
        huggingface_hub.model_info(src.repo, revision=src.revision, timeout=10)
    except Exception as e:  # not found, gated, no network: from_pretrained would fail the same way, slowly
        parent = Path(src.repo).parent
        local = (f"no local directory {src.repo} ({parent}/ exists: a typo?)" if parent != Path(".") and parent.is_dir()
                 else f"no local directory {src.repo}")
        raise ModelSourceError(f"model '{src.repo}': {local}, and the Hugging Face hub has no such model or could not be "
                               f"reached ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


def _from_pretrained(cls, src: ModelSource, **kwargs):
    """``cls.from_pretrained`` with the source's arguments; a hub id that cannot be fetched
    is an error that says why (offline, or unknown on the hub) and what to do."""
    try:
        return cls.from_pretrained(src.repo, **src.kwargs(), **kwargs)
    except OSError as e:
        if src.is_local:
            raise
        if huggingface_hub.is_offline_mode():
            raise ModelSourceError(
                f"model '{src.repo}' is not a local directory and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: download it once online (`hf download {src.repo}`) or point the path at a local directory") from e
        raise ModelSourceError(f"model '{src.repo}' is not a local directory, and could not be loaded from the Hugging Face "
                               f"hub (revision {src.revision or 'main'}): {str(e).splitlines()[0]}") from e


def load_pretrained(path: str | Path | ModelSource, *, dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local directory, a hub id or a GGUF file.

    ``path`` is a :class:`ModelSource` or a plain path / hub id. A hub id downloads as
    transformers does (or resolves from the local cache; ``HF_HUB_OFFLINE=1`` never
    downloads). A GGUF checkpoint is dequantised once into a plain model, so it trains,
    saves and reloads like any other (:func:`plain_model`). Dropout is switched off
    (:func:`disable_dropout`). The tokenizer must know its EOS token: generation stops on
    it and rewards sit on it; a missing pad token falls back to EOS, the usual choice for
    decoder-only models.
    """
    src = path if isinstance(path, ModelSource) else ModelSource.of(path)
    check_source(src)
    tokenizer = _from_pretrained(AutoTokenizer, src)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer of {src.repo} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = _from_pretrained(AutoModelForCausalLM, src, **({"dtype": dtype} if dtype is not None else {}))
    if src.gguf_file:
        model = plain_model(model)
    return disable_dropout(model), tokenizer


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a model that is not flagged as quantized.

    transformers dequantises GGUF tensors at load but keeps the model marked as a GGUF
    quantization, which ``save_pretrained`` refuses; a model built from the config
    without its ``quantization_config`` and given the loaded state is an ordinary one.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; keep the caller's RNG as it was
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"dequantised weights do not match the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.to(next(model.parameters()).device)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability to 0, in the modules and in the config.

    PPO's ratio compares the sampling policy with the one being updated, and the critic's
    targets must be deterministic: dropout in the update's forward (``model.train()``)
    would make the ratio of an unchanged policy differ from 1. Modules read their rate
    from an attribute copied out of the config at construction (``attention_dropout``,
    ``nn.Dropout.p``), so both are reset; the config so that saved checkpoints agree.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    for name, value in list(model.config.to_dict().items()):
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(model.config, name, 0.0)
    return model


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LMs since
    4.50): the vocabulary projection limited to the positions that are used."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def cache_argument(model: torch.nn.Module) -> str:
    """The name of the forward's KV-cache argument, also the output's field: ``cache``
    (transformers 5.24 on, ``past_key_values`` deprecated) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"



def eos_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and those of the model's
    ``generation_config`` and config (chat models list their end-of-turn token there,
    e.g. Qwen2.5's ``<|im_end|>`` and ``<|endoftext|>``), as ``generate`` stops on them."""
    ids = {tokenizer.eos_token_id}
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else (value or []))
    return sorted(i for i in ids if i is not None)


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


def load_critic(path: str | Path | ModelSource, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A critic saved by ``save_pretrained`` (a token-classification model, one label), from
    a local directory or a hub id; dropout off."""
    src = path if isinstance(path, ModelSource) else ModelSource.of(path)
    check_source(src)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    critic = _from_pretrained(AutoModelForTokenClassification, src, num_labels=1, **kwargs)
    if critic.config.num_labels != 1:
        raise ValueError(f"critic checkpoint {src.repo} has {critic.config.num_labels} labels; a critic has 1")
    return disable_dropout(critic)


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
    # a LoRA model saves its adapters; peft's "auto" would look the base up (on the hub) at every save
    extra = {"save_embedding_layers": False} if is_lora(model) else {}
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True, **extra)
    tokenizer.save_pretrained(path)


def num_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
