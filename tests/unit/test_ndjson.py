"""Streaming NDJSON parser: line numbering, error reporting, chunk-boundary independence."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.curation.ndjson import LineSplitter, aiter_ndjson, iter_ndjson
from adapters.curation.rows import Row, RowError, parse_row


def _sft(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def _parse(
    body: bytes, max_line_bytes: int = 1 << 20, chunk: int | None = None
) -> list[tuple[int, Row | RowError]]:
    chunks = [body] if chunk is None else [body[i : i + chunk] for i in range(0, len(body), chunk)]
    return list(iter_ndjson(chunks, max_line_bytes=max_line_bytes))


def test_valid_rows_with_crlf_bom_blank_lines_and_no_final_newline() -> None:
    lines = [json.dumps(_sft("héllo", "a")), "", "   ", json.dumps({"prompt": "p", "completion": "c"})]
    body = b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8")  # no trailing newline
    out = _parse(body)
    assert [n for n, _ in out] == [1, 4]
    assert all(isinstance(r, Row) for _, r in out)
    assert out[0][1].prompt[0].content == "héllo"  # type: ignore[union-attr]
    assert out[1][1].completion == "c"  # type: ignore[union-attr]


def test_every_kind_of_bad_line_becomes_a_row_error_with_its_number() -> None:
    body = b"\n".join(
        [
            json.dumps(_sft("ok", "fine")).encode(),  # 1 valid
            b"\xff\xfe not utf-8",  # 2
            b"{not json",  # 3
            b"[1, 2]",  # 4 not an object
            b'{"prompt": "x", "completion": NaN}',  # 5 NaN is not JSON
            json.dumps(
                {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}
            ).encode(),
            b"x" * 200,  # 7 over-long
            b"[" * 100_000,  # 8 deeply nested (over-long too, but checked against a large limit below)
        ]
    )
    out = dict(_parse(body, max_line_bytes=150))
    assert isinstance(out[1], Row)
    errors = {n: e for n, e in out.items() if isinstance(e, RowError)}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7, 8]
    assert "UTF-8" in errors[2].reason
    assert errors[3].reason.startswith("invalid JSON")
    assert "expected a JSON object" in errors[4].reason
    assert "NaN" in errors[5].reason
    assert errors[6].field == "messages[1].role"
    assert "longer than 150 bytes" in errors[7].reason

    deep = dict(_parse(b"[" * 100_000 + b"\n" + b"{" * 50_000, max_line_bytes=1 << 20))
    assert all(isinstance(e, RowError) for e in deep.values()) and sorted(deep) == [1, 2]


def test_over_long_line_resyncs_on_the_next_line_even_across_chunks() -> None:
    good = json.dumps(_sft("q", "a")).encode()
    body = good + b"\n" + b"y" * 1000 + b"\n" + good + b"\n"
    for chunk in (1, 7, 64, 4096):
        out = _parse(body, max_line_bytes=len(good), chunk=chunk)
        assert [n for n, _ in out] == [1, 2, 3]
        assert isinstance(out[0][1], Row) and isinstance(out[2][1], Row)
        assert isinstance(out[1][1], RowError)


def test_memory_is_bounded_by_one_line() -> None:
    splitter = LineSplitter(max_line_bytes=100)
    for _ in range(1000):  # a 1 MB line without newline never grows the buffer past the limit
        list(splitter.feed(b"z" * 1000))
        assert len(splitter._buf) <= 104
    (item,) = list(splitter.close())
    assert isinstance(item[1], RowError) and item[0] == 1


def test_async_parser_matches_sync_parser() -> None:
    body = (json.dumps(_sft("a", "b")) + "\n{bad\n" + json.dumps(_sft("c", "d"))).encode()

    async def chunks():
        for i in range(0, len(body), 5):
            yield body[i : i + 5]

    async def collect():
        return [item async for item in aiter_ndjson(chunks(), max_line_bytes=1000)]

    got = asyncio.run(collect())
    want = _parse(body)
    assert (
        [(n, type(r)) for n, r in got]
        == [(n, type(r)) for n, r in want]
        == [(1, Row), (2, RowError), (3, Row)]
    )
    assert got[2][1] == want[2][1]


texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
rows_strategy = st.lists(
    st.builds(_sft, texts, texts)
    | st.builds(lambda p, c, y: {"prompt": p, "completion": c, "label": y}, texts, texts, st.booleans()),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=rows_strategy,
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
    crlf=st.booleans(),
)
def test_any_chunking_of_a_valid_body_gives_the_same_rows(
    rows: list[dict], cuts: list[int], crlf: bool
) -> None:
    sep = "\r\n" if crlf else "\n"
    body = sep.join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8")
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)])]
    got = list(iter_ndjson(chunks, max_line_bytes=1 << 16))
    assert got == [(i + 1, parse_row(r)) for i, r in enumerate(rows)]


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_random_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]
    out = list(iter_ndjson(chunks, max_line_bytes=64))
    assert all(isinstance(r, (Row, RowError)) for _, r in out)
    numbers = [n for n, _ in out]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= data.count(b"\n") + 1 for n in numbers)
    assert out == list(iter_ndjson([data], max_line_bytes=64))  # chunking never changes the outcome


def test_rejects_nonpositive_limit() -> None:
    with pytest.raises(ValueError, match="max_line_bytes"):
        LineSplitter(0)
