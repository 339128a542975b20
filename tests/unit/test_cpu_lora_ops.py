"""The CPU LoRA ops (service/vllm/cpu_lora.py) against vLLM's own torch ops and a per-token loop."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

from service.vllm import cpu_lora

SLOTS, RANK = 3, 8


def _per_token(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time: its slot's matrix, or nothing for index -1."""
    w = w.squeeze(1)
    return torch.stack([x[t] @ w[i].T if i >= 0 else torch.zeros(w.shape[1]) for t, i in enumerate(idx.tolist())])


@pytest.mark.parametrize(("tokens", "one_adapter"), [(1, True), (5, False), (64, False), (64, True)])
def test_shrink_and_expand_match_vllm_and_the_definition(tokens: int, one_adapter: bool) -> None:
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 40, generator=g)
    a = torch.randn(SLOTS, 1, RANK, 40, generator=g)
    b = torch.randn(SLOTS, 1, 24, RANK, generator=g)
    idx = torch.full((tokens,), SLOTS - 2) if one_adapter else torch.randint(0, SLOTS, (tokens,), generator=g)

    ours, theirs = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    cpu_lora.bgmv_shrink(x, a, ours, idx, 0.5)
    vllm_ops.bgmv_shrink(x, a, theirs, idx, 0.5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, 0.5 * _per_token(x, a, idx), rtol=1e-4, atol=1e-4)

    base = torch.randn(tokens, 24, generator=g)
    ours, theirs = base.clone(), base.clone()
    cpu_lora.bgmv_expand(ours_in := torch.randn(tokens, RANK, generator=g), b, ours, idx, add_inputs=True)
    vllm_ops.bgmv_expand(ours_in, b, theirs, idx, add_inputs=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, base + _per_token(ours_in, b, idx), rtol=1e-4, atol=1e-4)

    wide = torch.zeros(tokens, 60)
    cpu_lora.bgmv_expand_slice(ours_in, b, wide, idx, 10, 24, add_inputs=False)
    torch.testing.assert_close(wide[:, 10:34], _per_token(ours_in, b, idx), rtol=1e-4, atol=1e-4)
    assert not wide[:, :10].any() and not wide[:, 34:].any()


def test_index_minus_one_means_no_adapter() -> None:
    """vLLM's CPU op reads -1 as the last slot; a base-model token must get no delta at all."""
    x = torch.randn(4, 40)
    a = torch.randn(SLOTS, 1, RANK, 40)
    b = torch.randn(SLOTS, 1, 24, RANK)
    idx = torch.tensor([0, -1, 2, -1])
    shrunk = torch.zeros(4, RANK)
    cpu_lora.bgmv_shrink(x, a, shrunk, idx, 1.0)
    assert not shrunk[1].any() and not shrunk[3].any() and shrunk[0].any()
    out = torch.zeros(4, 24)
    cpu_lora.bgmv_expand(torch.randn(4, RANK), b, out, idx, add_inputs=False)
    assert not out[1].any() and not out[3].any() and out[2].any()
    # the upstream op, for the record: it applies slot SLOTS-1 to the base token
    theirs = torch.zeros(4, RANK)
    vllm_ops.bgmv_shrink(x, a, theirs, idx, 1.0)
    torch.testing.assert_close(theirs[1], x[1] @ a[-1, 0].T, rtol=1e-4, atol=1e-4)


def test_register_replaces_the_ops_punica_cpu_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (vllm_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    wrapper = punica_cpu.PunicaWrapperCPU
    for name in ("update_metadata", "add_lora_linear"):
        monkeypatch.setattr(wrapper, name, getattr(wrapper, name))
    monkeypatch.setattr(wrapper, "_tuneloop_patched", False, raising=False)
    monkeypatch.setenv(cpu_lora.ENV, "vllm")
    cpu_lora.register()
    assert punica_cpu.bgmv_shrink is not cpu_lora.bgmv_shrink
    monkeypatch.delenv(cpu_lora.ENV)
    cpu_lora.register()
    assert punica_cpu.bgmv_shrink is cpu_lora.bgmv_shrink and vllm_ops.bgmv_expand is cpu_lora.bgmv_expand
    assert wrapper.add_lora_linear.__name__ == "fast_add_lora_linear"


@pytest.mark.parametrize("case", ["one adapter", "no adapter", "mixed"])
def test_linear_fast_path_matches_the_definition(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`PunicaWrapperCPU.add_lora_linear` with the plugin's per-step fast path (a private subclass, so the
    global class stays as it is) against the per-token definition, for a merged layer of two slices.
    A mixed batch (three adapters and base rows) takes the masked path over the used slots."""
    from vllm.lora.punica_wrapper import punica_cpu
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        monkeypatch.setattr(vllm_ops, name, getattr(cpu_lora, name))
        monkeypatch.setattr(punica_cpu, name, getattr(cpu_lora, name))

    cls = type("Wrapper", (PunicaWrapperCPU,), {})
    cpu_lora._install_linear_fast_path(cls)
    wrapper = cls(max_num_batched_tokens=64, max_batches=8, device="cpu")
    g = torch.Generator().manual_seed(7)
    tokens, widths = 6, (24, 16)
    idx = {"one adapter": torch.full((tokens,), 1), "no adapter": torch.full((tokens,), -1),
           "mixed": torch.tensor([0, 2, -1, 1, 1, 0])}[case]
    wrapper._token_lora_indices[:tokens] = idx
    wrapper.indices_len = [tokens] * 4
    wrapper.is_prefill = False
    cpu_lora.plan_step(wrapper, idx)
    assert wrapper._tuneloop_slot == {"one adapter": 1, "no adapter": cpu_lora.NO_ADAPTER, "mixed": None}[case]

    x = torch.randn(tokens, 40, generator=g)
    a = tuple(torch.randn(SLOTS, 1, RANK, 40, generator=g) for _ in widths)
    b = tuple(torch.randn(SLOTS, 1, w, RANK, generator=g) for w in widths)
    y = torch.randn(tokens, sum(widths), generator=g)
    expected = y.clone()
    offset = 0
    for ai, bi, w in zip(a, b, widths, strict=True):
        expected[:, offset: offset + w] += 0.5 * _per_token(_per_token(x, ai, idx), bi, idx)
        offset += w
    wrapper.add_lora_linear(y, x, a, b, 0.5, widths)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
