"""A tiny random Llama with a real tokenizer, for fast tests of the real training code paths."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(tokenizer_dir: str | Path, out_dir: str | Path, hidden_size: int = 64, layers: int = 2,
                    seed: int = 0) -> Path:
    """Save a random-initialised LlamaForCausalLM (fp32) plus the tokenizer of ``tokenizer_dir`` to ``out_dir``.

    The tokenizer keeps the real chat template and the pad == eos quirk, so masking bugs show up here too.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
