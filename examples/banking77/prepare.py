"""Turn Banking77 (CSV: text,category) into chat-format JSONL that tuneloop's data upload accepts.

Each row becomes ``{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": category}]}``
(no system prompt: the deployment's chat template decides that). ``--limit`` takes a seeded random
sample, so small demo uploads are reproducible.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# shared/ lives beside the repository (the repo root's parent holds it).
DEFAULT_INPUT = REPO_ROOT.parent / "shared" / "datasets" / "banking77" / "train.csv"


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "category"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return [(r["text"], r["category"]) for r in reader]


def to_chat(text: str, category: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": category}]}


def prepare(path: Path, limit: int | None = None, seed: int = 0) -> Iterator[dict[str, list[dict[str, str]]]]:
    """Chat rows in file order; with ``limit`` a seeded sample (kept in file order)."""
    rows = read_rows(path)
    if limit is not None and limit < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
        rows = [rows[i] for i in keep]
    for text, category in rows:
        yield to_chat(text, category)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", type=Path, default=DEFAULT_INPUT, help=f"CSV with text,category (default {DEFAULT_INPUT})"
    )
    parser.add_argument("--output", type=Path, default=None, help="JSONL file to write (default: stdout)")
    parser.add_argument(
        "--limit", type=int, default=None, help="take a seeded random sample of this many rows"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for --limit sampling")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 0:
        parser.error("--limit must be >= 0")
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        n = 0
        for row in prepare(args.input, args.limit, args.seed):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    finally:
        if args.output:
            out.close()
    print(f"wrote {n} rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
