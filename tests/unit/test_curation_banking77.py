"""Upload-equivalent run on real Banking77 rows: prepare → NDJSON stream → pipeline → report (real evidently)."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from adapters.curation import (
    CurationConfig,
    Row,
    RowError,
    iter_ndjson,
    quality_report,
    quality_report_html,
    run_pipeline,
)
from adapters.curation.steps import _jaccard, _shingles

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "banking77_prepare", REPO / "examples" / "banking77" / "prepare.py"
)
assert _spec and _spec.loader
prepare_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_mod)


def _user(row: dict) -> str:
    return row["messages"][0]["content"]


def _run(lines: list[dict]) -> tuple:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode("utf-8")
    parsed = list(
        iter_ndjson((body[i : i + 4093] for i in range(0, len(body), 4093)), max_line_bytes=1 << 16)
    )
    rows = [r for _, r in parsed if isinstance(r, Row)]
    errors = [(n, r) for n, r in parsed if isinstance(r, RowError)]
    return run_pipeline(rows, CurationConfig(seed=3)), errors


@pytest.fixture(scope="module")
def sample() -> list[dict]:
    assert prepare_mod.DEFAULT_INPUT == REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
    return list(prepare_mod.prepare(prepare_mod.DEFAULT_INPUT, limit=500, seed=0))


def test_prepare_cli_writes_chat_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "b77.jsonl"
    assert prepare_mod.main(["--output", str(out), "--limit", "7", "--seed", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 7
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert re.fullmatch(r"[a-z_?]+", r["messages"][1]["content"])
    again = tmp_path / "again.jsonl"
    prepare_mod.main(["--output", str(again), "--limit", "7", "--seed", "2"])
    assert again.read_text() == out.read_text()


def test_duplicates_and_near_duplicates_are_removed_and_reported(sample: list[dict]) -> None:
    baseline, _ = _run(sample)

    exact = [
        sample[0],
        sample[0],
        sample[1],
        sample[5],
        sample[5],
        sample[5],
        sample[9],
        sample[42],
    ]  # 8 copies
    longish = sorted(sample, key=lambda r: -len(_user(r).split()))[:3]
    near = []
    for r in longish:
        words = _user(r).split()
        words[len(words) // 2] = "zebra"  # one word changed
        near.append({"messages": [{"role": "user", "content": " ".join(words)}, r["messages"][1]]})
        assert _jaccard(_shingles(_user(r), 1, ""), _shingles(" ".join(words), 1, "")) >= 0.9
    lines: list = sample + exact + near
    result, errors = _run(lines)

    assert errors == []
    assert result.input_count == 511
    ex, nd = result.step("exact_dedupe"), result.step("near_dedupe")
    assert ex.removed == baseline.step("exact_dedupe").removed + 8
    assert nd.removed == baseline.step("near_dedupe").removed + 3
    out_prompts = {r.prompt[0].content for r in result.train + result.validation}
    for original, dup in zip(longish, near):
        norm = " ".join(_user(original).split())  # the normalize step collapsed whitespace runs
        assert norm in out_prompts and " ".join(_user(dup).split()) not in out_prompts
    assert any(e["row"]["prompt"][0]["content"] == _user(near[0]) for e in nd.examples) or nd.removed > len(
        nd.examples
    )

    # same data, same config → same snapshot
    assert _run(lines)[0].content_hash() == result.content_hash()

    rep = quality_report(result)
    assert rep["input_count"] == 511
    assert (
        rep["counts"]["train"] + rep["counts"]["validation"]
        == 511 - rep["removed_total"] + rep["added_total"]
    )
    assert rep["counts"] == {"train": len(result.train), "validation": len(result.validation)}
    assert rep["label_like"] is True
    steps = {s["name"]: s for s in rep["steps"]}
    assert steps["exact_dedupe"]["reasons"]["exact_duplicate"] == ex.removed
    assert steps["near_dedupe"]["reasons"]["near_duplicate"] == nd.removed
    assert steps["split"]["details"]["stratified"] is True
    train = rep["splits"]["train"]
    assert sum(train["labels"].values()) == len(result.train)
    assert train["kinds"] == {"sft": len(result.train)}
    assert 0.07 <= len(result.validation) / (len(result.train) + len(result.validation)) <= 0.13
    assert train["answer_words"]["max"] == 1 and train["prompt_words"]["max"] >= 20
    json.dumps(rep)  # JSON-ready

    page = quality_report_html(result)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<iframe class='evidently'" in page and "evidently summary failed" not in page
    assert "drawDashboard" in page  # evidently's own renderer, embedded (escaped) in srcdoc
    assert "near_duplicate: " + str(nd.removed) in page
    assert "zebra" in page  # a near-duplicate example is shown
    assert "<script src=" not in page.split("<iframe", 1)[0]  # our part loads nothing from outside


def test_group_reweighing_and_report_attributes(sample: list[dict]) -> None:
    rows = []
    for i, r in enumerate(sample[:120]):
        r = dict(r, attributes={"segment": "retail" if i % 3 else "business"})
        rows.append(r)
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    parsed = [r for _, r in iter_ndjson([body]) if isinstance(r, Row)]
    result = run_pipeline(parsed, CurationConfig.from_dict({"group_balance": {"attribute": "segment"}}))
    assert result.weights is not None and len(result.weights) == len(result.train)
    rep = quality_report(result)
    seg = rep["splits"]["train"]["attributes"]["segment"]
    assert set(seg) == {"retail", "business"}
    assert seg["retail"] + seg["business"] == len(result.train)
    assert rep["splits"]["train"]["weights"]["count"] == len(result.train)
    page = quality_report_html(result, include_evidently=False)
    assert "Group weights" in page and "segment" in page and "<iframe" not in page


def test_length_filter_counts_tokens_with_the_base_models_tokenizer(
    base_model_dir: str, sample: list[dict]
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    rows = [r for _, r in iter_ndjson(["".join(json.dumps(r) + "\n" for r in sample[:200]).encode()])]
    cfg = CurationConfig.from_dict(
        {"length_filter": {"min_tokens": 11, "max_tokens": 24}, "near_dedupe": False}
    )
    result = run_pipeline(rows, cfg, count_tokens)
    rep = result.step("length_filter")
    kept = result.train + result.validation
    totals = [count_tokens(r.prompt_text()) + count_tokens(r.answer) for r in kept]
    assert totals and all(11 <= t <= 24 for t in totals)
    assert rep.reasons.get("too_long", 0) > 0 and rep.reasons.get("too_short", 0) > 0
    removed = sum(s.removed for s in result.steps)
    assert len(kept) == 200 - removed + result.step("label_balance").added and rep.removed > 0
    assert all(e["tokens"] > 24 or e["tokens"] < 11 for e in rep.examples)


def test_empty_and_mixed_inputs_produce_a_report() -> None:
    empty = run_pipeline([], CurationConfig())
    assert empty.train == [] and empty.validation == [] and empty.input_count == 0
    rep = quality_report(empty)
    assert (
        rep["counts"] == {"train": 0, "validation": 0}
        and rep["splits"]["train"]["prompt_chars"]["count"] == 0
    )
    assert "no training rows" in quality_report_html(empty)

    lines = [
        {"prompt": "Is the sky blue?", "chosen": "Yes, on a clear day.", "rejected": "No."},
        {"prompt": "Is grass green?", "completion": "Yes.", "label": True},
        {"prompt": "Name a colour.", "completion": "Blue."},
        {"prompt": "Name a fruit.", "completion": "An apple."},
    ]
    rows = [r for _, r in iter_ndjson([("\n".join(json.dumps(x) for x in lines)).encode()])]
    mixed = run_pipeline(rows, CurationConfig.from_dict({"split": {"validation_fraction": 0.25}}))
    assert not mixed.label_like and len(mixed.train) == 3 and len(mixed.validation) == 1
    rep = quality_report(mixed)
    kinds = Counter(rep["splits"]["train"]["kinds"]) + Counter(rep["splits"]["validation"]["kinds"])
    assert kinds == {"preference": 1, "unpaired": 1, "sft": 2}
    page = quality_report_html(mixed)
    assert "<iframe class='evidently'" in page and "evidently summary failed" not in page
