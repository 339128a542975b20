"""Faster, correct LoRA matmuls for vLLM on CPU, installed as a vLLM general plugin.

vLLM's CPU LoRA path (`vllm.lora.ops.torch_ops`, used by `PunicaWrapperCPU`) computes every token's LoRA
product by first copying that token's whole adapter matrix (`weights[indices]`: tokens × out × in floats)
and then running a batched mat-vec. For a prefill of a few hundred tokens that copy costs 5–30× the
product itself. It also reads index -1 ("no adapter", a base-model request in a mixed batch) as Python's
"last slot", so a base request that shares a batch with LoRA requests while every slot is occupied gets
the last slot's adapter applied.

Here, once per step (in `update_metadata`), the plugin finds which adapter each token uses, and a LoRA linear
layer is two matmuls per output slice added in place: with that adapter's A and B when every token uses the
same one; otherwise with the used adapters' A and B side by side and a mask that keeps each token's own part
(`MixedStep`). The other LoRA products (vLLM calls the ops below for the rest) are each one dense matmul over
all resident slots (there are `--max-loras` of them, a handful):
 - shrink (in → rank): `x @ [A_0; A_1; ...]ᵀ`, then each token keeps its slot's `rank` columns;
 - expand (rank → out): each token's rank vector goes into its slot's block of a zero row, then one matmul
   with `[B_0 | B_1 | ...]`.
Tokens with index -1 get a zero delta. Nothing else changes: same signatures, same in-place outputs.

vLLM loads `register()` in every process it starts (entry point group `vllm.general_plugins`). The
supervisor's vLLM gets it by default; `TUNELOOP_VLLM_CPU_LORA=vllm` keeps vLLM's own ops (the benchmark's
baseline).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger("tuneloop.vllm.cpu_lora")
ENV = "TUNELOOP_VLLM_CPU_LORA"


def _slots(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(slots, out, in) in the output's dtype: vLLM stacks adapters as (slots, 1, out, in)."""
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    return weights.to(dtype)


def _single_slot(indices: torch.Tensor) -> int | None:
    """The slot every token uses, when they all use the same adapter (the usual batch): one plain matmul."""
    first = int(indices[0]) if indices.numel() else -1
    return first if first >= 0 and bool((indices == first).all()) else None


def lora_shrink(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """Row t: `inputs[t] @ weights[indices[t]]ᵀ`, zero where `indices[t] < 0`. For a small output (the rank)."""
    w = _slots(weights, dtype)
    one = _single_slot(indices)
    if one is not None:
        return inputs.to(dtype) @ w[one].T
    slots, out, _ = w.shape
    every = (inputs.to(dtype) @ w.reshape(slots * out, -1).T).view(-1, slots, out)
    picked = every[torch.arange(every.shape[0]), indices.clamp(min=0)]
    return picked.masked_fill_((indices < 0).unsqueeze(1), 0.0)


def lora_expand(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The same product for a small input (the rank): rows scattered into per-slot blocks, one matmul."""
    w = _slots(weights, dtype)
    one = _single_slot(indices)
    if one is not None:
        return inputs.to(dtype) @ w[one].T
    slots, out, rank = w.shape
    rows = inputs.shape[0]
    spread = torch.zeros(rows, slots, rank, dtype=dtype)
    keep = indices >= 0
    spread[torch.arange(rows)[keep], indices[keep]] = inputs.to(dtype)[keep]
    return spread.view(rows, slots * rank) @ w.permute(0, 2, 1).reshape(slots * rank, out)


def bgmv_shrink(inputs: torch.Tensor, lora_a_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, scaling: float = 1.0) -> None:
    outputs = lora_shrink(inputs, lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                lora_indices_tensor: torch.Tensor, add_inputs: bool = True) -> None:
    outputs = lora_expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:  # as vLLM's op: one row broadcast
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: torch.Tensor, lora_b_weights: torch.Tensor, output_tensor: torch.Tensor,
                      lora_indices_tensor: torch.Tensor, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    outputs = lora_expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset: slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset: slice_offset + slice_size] = outputs


NO_ADAPTER = -1


def batch_slot(indices: torch.Tensor) -> int | None:
    """NO_ADAPTER when no token uses an adapter, the slot when all use the same one, else None (mixed)."""
    if indices.numel() and bool((indices < 0).all()):
        return NO_ADAPTER
    return _single_slot(indices)


class MixedStep:
    """A step whose tokens use different adapters (an A/B experiment, a swap while the old adapter's requests
    finish, base requests beside LoRA ones): the slots in use, and per LoRA rank a 0/1 mask that keeps, for each
    token, only its own slot's part of the product with every used slot's A."""

    def __init__(self, indices: torch.Tensor) -> None:
        self.rows = indices.numel()
        self.indices = indices.clone()
        self.slots = indices[indices >= 0].unique()
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def mask(self, rank: int, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, dtype)
        if key not in self._masks:
            own = self.indices.unsqueeze(1) == self.slots.unsqueeze(0)  # tokens × used slots
            self._masks[key] = own.to(dtype).repeat_interleave(rank, dim=1)
        return self._masks[key]


def plan_step(wrapper: Any, indices: torch.Tensor) -> None:
    """What the fast path needs to know about this step's tokens, found once per step."""
    wrapper._tuneloop_slot = batch_slot(indices)
    wrapper._tuneloop_mixed = MixedStep(indices) if wrapper._tuneloop_slot is None else None


def _install_linear_fast_path(wrapper_cls: type) -> None:
    """Per step, find which adapter each token uses. When all use one (or none), a LoRA linear layer is two
    matmuls per output slice (`y[:, slice] += (scale · x @ Aᵀ) @ Bᵀ`) instead of vLLM's ~10 small ops per
    slice. A mixed step does the same with the used slots' A and B side by side, and a mask that keeps each
    token's own slot."""
    update_metadata, add_lora_linear = wrapper_cls.update_metadata, wrapper_cls.add_lora_linear

    def update_metadata_and_slot(self: Any, *args: Any, **kwargs: Any) -> None:
        update_metadata(self, *args, **kwargs)
        plan_step(self, self.token_lora_indices)

    def fast_add_lora_linear(self: Any, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: tuple[torch.Tensor, ...],
                             lora_b_stacked: tuple[torch.Tensor, ...], scale: float,
                             output_slices: tuple[int, ...], **kwargs: Any) -> None:
        slot = getattr(self, "_tuneloop_slot", None)
        if slot == NO_ADAPTER:
            return None
        out, x = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        mixed = getattr(self, "_tuneloop_mixed", None) if slot is None else None
        if slot is None and (mixed is None or mixed.rows != x.shape[0]):  # not this step's tokens: vLLM's path
            return add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)
        xs = x.to(out.dtype)
        offset = 0
        for a, b, width in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
            a_all, b_all = _slots(a, out.dtype), _slots(b, out.dtype)
            if mixed is None:
                hidden = torch.mm(xs, a_all[slot].T).mul_(scale)
                out[:, offset: offset + width].addmm_(hidden, b_all[slot][:width].T)
            else:
                used, rank = mixed.slots, a_all.shape[1]
                hidden = torch.mm(xs, a_all[used].reshape(-1, a_all.shape[2]).T)  # tokens × (used · rank)
                hidden.mul_(mixed.mask(rank, out.dtype)).mul_(scale)
                b_used = b_all[used][:, :width].permute(1, 0, 2).reshape(width, -1)  # width × (used · rank)
                out[:, offset: offset + width].addmm_(hidden, b_used.T)
            offset += width
        return None

    wrapper_cls.update_metadata = update_metadata_and_slot
    wrapper_cls.add_lora_linear = fast_add_lora_linear


def register() -> None:
    """vLLM general plugin: replace the CPU LoRA ops (vLLM's sgmv_* ops call these bgmv_* ones) and add the
    one-adapter fast path to `PunicaWrapperCPU`."""
    if os.environ.get(ENV, "tuneloop") == "vllm":
        return
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for module in (lora_ops, punica_cpu):
        module.bgmv_shrink = bgmv_shrink  # type: ignore[attr-defined]
        module.bgmv_expand = bgmv_expand  # type: ignore[attr-defined]
        module.bgmv_expand_slice = bgmv_expand_slice  # type: ignore[attr-defined]
    if not getattr(punica_cpu.PunicaWrapperCPU, "_tuneloop_patched", False):  # plugins may load twice
        _install_linear_fast_path(punica_cpu.PunicaWrapperCPU)
        punica_cpu.PunicaWrapperCPU._tuneloop_patched = True  # type: ignore[attr-defined]
    log.info("tuneloop CPU LoRA ops installed (%s=vllm keeps vLLM's)", ENV)
