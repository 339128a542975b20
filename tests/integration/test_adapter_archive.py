"""Adapters out and in as tar archives, through the real service and vLLM: an exported adapter imported into
another deployment answers exactly as the original does; a bad archive is a 422 naming what is wrong, and
registers nothing."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest_vllm import make_random_lora, register_random_lora

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
TAR = {"content-type": "application/x-tar"}
PROMPT = {"temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": "Where is my new card?"}]}


def _tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _adapters(c, deployment: str) -> list[str]:
    return [a["id"] for a in c.get("/v1/adapters", params={"deployment": deployment}).json()["data"]]


def test_an_exported_adapter_imported_elsewhere_answers_the_same(service, base_model_dir, tmp_path) -> None:
    with service.client() as c:
        for name in ("exporter", "importer"):
            assert c.post("/v1/deployments", json={"name": name}).status_code == 201
        original = register_random_lora(service.data_dir / "tuneloop.db", Path(base_model_dir), tmp_path / "lora",
                                        "exporter", seed=11)
        r = c.get(f"/v1/adapters/{original}/archive")
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar", r.text
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
            names = sorted(tar.getnames())
            assert names == [f"{original}/{n}" for n in ("README.md", "adapter_config.json",
                                                           "adapter_model.safetensors")]
            assert tar.extractfile(f"{original}/adapter_model.safetensors").read() == \
                (tmp_path / "lora" / "adapter_model.safetensors").read_bytes()

        # gzip'd, as `tar czf` makes it
        r = c.post("/v1/adapters", params={"deployment": "importer"}, content=gzip.compress(r.content),
                   headers={"content-type": "application/gzip"})
        assert r.status_code == 201, r.text
        imported = r.json()
        assert imported["deployment"] == "importer" and imported["method"] == "import" and imported["version"] == 1
        assert imported["hyperparameters"] == {"lora_r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
        assert imported["evaluation_id"]  # queued at once: it meets the same gates as an adapter trained here

        base = c.post("/v1/chat/completions", json={**PROMPT, "model": "importer"}).json()["choices"][0]["message"]
        for deployment, adapter_id in (("exporter", original), ("importer", imported["id"])):
            r = c.post(f"/v1/deployments/{deployment}/promote", json={"adapter_id": adapter_id, "force": True})
            assert r.status_code == 200, r.text
        here, there = (c.post("/v1/chat/completions", json={**PROMPT, "model": m}) for m in ("exporter", "importer"))
        assert there.headers["x-tuneloop-adapter"].startswith(f"importer--{imported['id']}")
        assert here.json()["choices"][0]["message"] == there.json()["choices"][0]["message"] != base
        assert c.get("/v1/adapters/adp-missing/archive").status_code == 404


def test_a_bad_archive_is_a_422_naming_the_fault_and_registers_nothing(service, base_model_dir, tmp_path) -> None:
    good = make_random_lora(Path(base_model_dir), tmp_path / "good", rank=8, seed=3)
    config = (good / "adapter_config.json").read_bytes()
    weights = (good / "adapter_model.safetensors").read_bytes()
    wide = tmp_path / "wide.safetensors"  # q_proj's lora_A for a hidden size of 1024, not SmolLM2's 576
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 1024),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(576, 8)}, str(wide))
    rank64 = json.dumps({**json.loads(config), "r": 64}).encode()
    nan = tmp_path / "nan.safetensors"  # the right shapes, one NaN
    tensors = load_file(str(good / "adapter_model.safetensors"))
    poisoned = max(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[poisoned][0, 0] = float("nan")
    save_file(tensors, str(nan))
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": "strict"}).status_code == 201
        cases = [
            (b"not a tar at all", "body"),
            (_tar({"adapter/adapter_config.json": config}), "body.adapter_model.safetensors"),
            (_tar({"adapter_config.json": config, "adapter_model.bin": b"\x80\x04pickle"}), "body.adapter_model.bin"),
            (_tar({"../adapter_config.json": config, "adapter_model.safetensors": weights}),
             "body.../adapter_config.json"),
            (_tar({"adapter_config.json": b"{", "adapter_model.safetensors": weights}), "body.adapter_config.json"),
            (_tar({"adapter_config.json": config, "adapter_model.safetensors": b"\x00" * 64}),
             "body.adapter_model.safetensors"),
            (_tar({"adapter_config.json": config, "adapter_model.safetensors": wide.read_bytes()}),
             "body.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
            (_tar({"adapter_config.json": config, "adapter_model.safetensors": nan.read_bytes()}), f"body.{poisoned}"),
        ]
        for body, field in cases:
            r = c.post("/v1/adapters", params={"deployment": "strict"}, content=body, headers=TAR)
            assert r.status_code == 422 and r.json()["field"] == field, (field, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
        r = c.post("/v1/adapters", params={"deployment": "strict"}, headers=TAR,  # a config of another rank
                   content=_tar({"adapter_config.json": rank64, "adapter_model.safetensors": weights}))
        assert r.status_code == 422 and ".lora_" in r.json()["field"] and "r 64" in r.json()["detail"], r.text
        assert _adapters(c, "strict") == []
        r = c.post("/v1/adapters", params={"deployment": "strict"}, headers=TAR,  # files at the top: fine
                   content=_tar({"adapter_config.json": config, "adapter_model.safetensors": weights}))
        assert r.status_code == 201 and r.json()["hyperparameters"]["lora_r"] == 8, r.text
        assert _adapters(c, "strict") == [r.json()["id"]]
        assert c.post("/v1/adapters", params={"deployment": "strict"}, content=_tar({}),
                      headers={"content-type": "application/json"}).status_code == 415
        assert c.post("/v1/adapters", params={"deployment": "nowhere"}, content=_tar({}),
                      headers=TAR).status_code == 404
