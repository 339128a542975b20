"""A big upload on the real PostgreSQL keeps its dedupe lookup index-driven as the table grows.

Regression: without statistics (autovacuum is off on this machine's PostgreSQL, and late elsewhere) the
planner guessed that `dataset_id = X` matches 0.5 % of the rows, so the lookup of each batch
(`dataset_id = X AND content_hash IN (… 1,000 hashes …)`) found the dataset's rows by `dataset_id` alone and
filtered the hashes over every one of them (auto_explain: 7–8 s per batch at ~150k rows), and
`benchmarks/ingest.py --postgres` fell to ~100–400 rows/s (4,539 rows/s with the fix). Uploads now ANALYZE as they grow.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import asyncpg
import pytest
from sqlalchemy import bindparam, text

from service.core.datasets import BATCH, DatasetService
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Deployment
from tests.conftest import PG_URL, _reset_pg

pytestmark = pytest.mark.postgres
BULK = 200_000


async def test_upload_lookup_uses_both_index_columns_after_the_table_grew(tmp_path) -> None:
    await asyncio.to_thread(_reset_pg)
    await asyncio.to_thread(upgrade, PG_URL)
    engine = make_engine(PG_URL)
    sessions = make_sessionmaker(engine)
    try:
        async with sessions() as s, s.begin():
            s.add(Deployment(name="big", base_model="unused", config={}))
        datasets = DatasetService(sessions, tmp_path, count_tokens=len)
        ds = await datasets.create("big", "big")

        async def batch(tag: str):
            yield b"".join(json.dumps({"prompt": f"{tag} question {i}", "completion": f"intent_{i % 77}"}).encode()
                           + b"\n" for i in range(BATCH))

        first = await datasets.upload(ds.id, batch("first"), "reject")
        # The table grows by 200k rows of this dataset (a bulk load stands in for many uploads: it is fast) ...
        admin = await asyncpg.connect(PG_URL.replace("+asyncpg", ""))
        try:
            await admin.copy_records_to_table(
                "dataset_records", columns=["dataset_id", "upload_id", "content_hash", "row"],
                records=[(ds.id, first.upload_id, hashlib.sha256(str(i).encode()).hexdigest(), "{}")
                         for i in range(BULK)])
        finally:
            await admin.close()
        # ... and the next upload leaves statistics behind that the following lookups plan with.
        assert (await datasets.upload(ds.id, batch("next"), "reject")).accepted == BATCH
        lookup = text("EXPLAIN SELECT content_hash FROM dataset_records WHERE dataset_id = :d "
                      "AND content_hash IN :h").bindparams(bindparam("h", expanding=True))
        async with engine.connect() as conn:
            plan = [line.strip() for line in (await conn.execute(
                lookup, {"d": ds.id, "h": [f"{i:064x}" for i in range(BATCH)]})).scalars()]
    finally:
        await engine.dispose()
    index_conditions = [line for line in plan if line.startswith(("Index Cond", "Recheck Cond"))]
    filters = [line for line in plan if line.startswith("Filter")]
    assert any("content_hash" in line for line in index_conditions), plan  # the hashes are looked up ...
    assert not any("content_hash" in line for line in filters), plan  # ... not filtered over the dataset
