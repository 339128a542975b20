"""Adapter archives: a PEFT LoRA directory as a tar file, to take an adapter to another serving stack, or to bring
one trained elsewhere to be evaluated and served here.

An archive from outside is untrusted: only regular files are unpacked, under the destination, and only what a
LoRA adapter is made of (its config, safetensors weights, a README). Pickled weights (`.bin`, `.pt`) are refused,
because loading them can run code. Every LoRA tensor is checked against the base model's weight it adapts, so a
mismatched adapter is a clear error at upload, not a vLLM engine that fails at the first request.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
ALLOWED = {CONFIG, WEIGHTS, "README.md"}


class ArchiveError(ValueError):
    """What is wrong with an uploaded adapter; `member` names the file or tensor at fault."""

    def __init__(self, message: str, member: str | None = None) -> None:
        super().__init__(message)
        self.member = member


def pack(adapter_dir: Path, archive: Path, top: str) -> None:
    """Write the adapter's files (those `unpack` takes back) into an uncompressed tar (safetensors barely
    compress) under `top/`."""
    with tarfile.open(archive, "w") as tar:
        for f in sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.name in ALLOWED):
            tar.add(f, arcname=f"{top}/{f.name}")


def unpack(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract an adapter from a tar (gzip or not) into `dest`: its files may sit at the top or in one folder.
    At most `max_bytes` unpacked (a small gzip can declare a huge file)."""
    try:
        tar = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"the body is not a tar archive: {exc}") from exc
    with tar:
        files = {}
        for m in tar.getmembers():
            parts = PurePosixPath(m.name).parts
            if m.isdir():
                continue
            if not m.isfile() or m.name.startswith("/") or ".." in parts or len(parts) > 2:
                raise ArchiveError(f"archive member {m.name!r} is not a file of the adapter's folder", m.name)
            name = parts[-1]
            if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
                raise ArchiveError(f"{m.name}: weights must be safetensors (pickled weights can run code)", m.name)
            if name not in ALLOWED:
                raise ArchiveError(f"{m.name}: an adapter archive holds only {', '.join(sorted(ALLOWED))}", m.name)
            if name in files:
                raise ArchiveError(f"{m.name}: the archive holds {name} twice", m.name)
            files[name] = m
        if sum(m.size for m in files.values()) > max_bytes:
            raise ArchiveError(f"the archive unpacks to more than the limit of {max_bytes} bytes")
        for required in (CONFIG, WEIGHTS):
            if required not in files:
                raise ArchiveError(f"the archive has no {required}", required)
        dest.mkdir(parents=True)
        for name, m in files.items():
            src = tar.extractfile(m)
            assert src is not None  # a regular file
            with src, (dest / name).open("wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)


def check_fits(adapter_dir: Path, base_dir: Path) -> dict[str, Any]:
    """Check that a LoRA adapter adapts this base model: a LoRA config, and every lora_A (r × in) and lora_B
    (out × r) tensor the shape of the base weight (out × in) it adds to, of finite floats. Returns its LoRA shape (`lora_r` the
    largest rank of any module, which is what vLLM's `--max-lora-rank` must admit)."""
    from safetensors import safe_open

    try:
        cfg = json.loads((adapter_dir / CONFIG).read_text(encoding="utf-8"))
        shape = {"lora_r": int(cfg["r"]), "lora_alpha": int(cfg["lora_alpha"]), "target_modules": sorted(cfg["target_modules"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise ArchiveError(f"{CONFIG} is not a PEFT LoRA config: {exc!r}", CONFIG) from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ArchiveError(f"{CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA", CONFIG)

    base: dict[str, list[int]] = {}
    for f in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            base.update({k: st.get_slice(k).get_shape() for k in st.keys()})  # noqa: SIM118 - not a dict
    try:
        with safe_open(str(adapter_dir / WEIGHTS), "pt") as st:
            tensors = {k: st.get_slice(k).get_shape() for k in st.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ArchiveError(f"{WEIGHTS} is not a safetensors file: {exc}", WEIGHTS) from exc
    if not tensors:
        raise ArchiveError(f"{WEIGHTS} holds no tensors", WEIGHTS)
    ranks: dict[str, dict[str, int]] = {}  # module → {"A": rank, "B": rank}: a rank_pattern may vary it
    for key, dims in tensors.items():
        module, _, kind = key.rpartition(".lora_")
        target = module.removeprefix("base_model.model.") + ".weight"
        if kind not in ("A.weight", "B.weight") or len(dims) != 2:
            raise ArchiveError(f"tensor {key}: only LoRA A and B matrices are served", key)
        if target not in base:
            raise ArchiveError(f"tensor {key}: the base model has no {target}", key)
        out, inp = base[target]
        if (kind == "A.weight" and dims[1] != inp) or (kind == "B.weight" and dims[0] != out):
            raise ArchiveError(f"tensor {key} has shape {list(dims)}, which does not fit {target} {[out, inp]}", key)
        rank = dims[0] if kind == "A.weight" else dims[1]
        if rank != shape["lora_r"] and not cfg.get("rank_pattern"):
            raise ArchiveError(f"tensor {key} has rank {rank}, and {CONFIG} says r {shape['lora_r']}", key)
        ranks.setdefault(module, {})[kind[0]] = rank
    for module, pair in ranks.items():
        if len(pair) != 2 or pair["A"] != pair["B"]:
            raise ArchiveError(f"{module}: lora_A and lora_B must both be there, of one rank; got {pair}", module)
    with safe_open(str(adapter_dir / WEIGHTS), "pt") as st:  # values too: a NaN serves garbage, it does not fail
        for key in tensors:
            t = st.get_tensor(key)
            if not t.is_floating_point() or not bool(t.isfinite().all()):
                raise ArchiveError(f"tensor {key} holds values that are not finite floating point numbers", key)
    shape["lora_r"] = max(pair["A"] for pair in ranks.values())
    return shape
