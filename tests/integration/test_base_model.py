"""Base model conversion from a real GGUF (the bundled SmolLM2 file; real transformers, real files)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, GenerationConfig

from adapters.base_model import _gguf_path, convert_gguf, verify
from adapters.training.data import encode_sft

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def test_convert_gguf_adds_a_chat_template_and_an_end_of_turn(tmp_path: Path) -> None:
    """What a pretrained GGUF without a chat template needs (examples/banking77/pypi_base.py): the template
    renders, the end-of-turn token ends every training answer and stops generation next to the GGUF's own
    EOS, and the checksummed directory verifies until a file changes."""
    out = convert_gguf(_gguf_path(), tmp_path / "m", chat_template=TEMPLATE, end_of_turn="<|endoftext|>")
    tok = AutoTokenizer.from_pretrained(out)
    user = [{"role": "user", "content": "where is my card?"}]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "[user] where is my card?<|endoftext|>[assistant] ")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == eot
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert GenerationConfig.from_pretrained(out).eos_token_id == [im_end, eot]
    example = encode_sft(tok, user, "card_arrival", 64)
    answer = example.input_ids[example.prompt_len:]
    assert tok.decode(answer[:-1]).strip() == "card_arrival" and answer[-1] == eot
    assert verify(out)
    (out / "config.json").write_text("{}")
    assert not verify(out)
