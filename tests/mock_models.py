"""Models with known outputs for engine tests.

:func:`countdown_model` is a real ``LlamaForCausalLM`` (so the engine's KV-cache path is
exercised) whose weights are set by hand: the attention and MLP outputs are zeroed, so
the residual stream is the one-hot token embedding, and the LM head maps token ``c`` to
``c - 1`` with a logit margin of 30 (probability 1 - 1e-10). Ids 0-3 are pad, bos,
eos, unk; a prompt ending in ``count_token(n)`` yields exactly ``n`` response tokens:
``n - 1`` countdown tokens, then EOS.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, EOS = 0, 1, 2
FIRST = 4  # count_token(1): after it the model writes EOS


def count_token(n: int) -> int:
    """The prompt token after which the model writes exactly n tokens (the last is EOS)."""
    return FIRST + n - 1


def countdown_model(max_count: int = 300, margin: float = 30.0) -> LlamaForCausalLM:
    vocab = FIRST + max_count
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=vocab,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        model.model.norm.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        # After the final RMSNorm a one-hot e_c becomes sqrt(H) e_c.
        scale = margin / vocab**0.5
        head = model.lm_head.weight
        for c in range(vocab):
            head[c - 1 if c > FIRST else EOS, c] = scale
    return model.eval()
