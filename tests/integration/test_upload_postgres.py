"""PostgreSQL connections plan every statement with its parameters (`plan_cache_mode=force_custom_plan`).

Regression: asyncpg caches prepared statements, and after five runs PostgreSQL may switch a statement to a
generic plan. For the dedupe lookup of an upload (`dataset_id = $1 AND content_hash IN ($2 … $1001)`) the
generic plan found the dataset's rows by the index on `dataset_id` alone and filtered their hashes, reading
every row of the dataset for every batch of 1,000 (auto_explain: 7–8 s per batch at ~150k rows), and
`benchmarks/ingest.py --postgres` slowed from ~2,600 to ~200 rows/s. Small reproductions (8 uploads, then
200k rows bulk-loaded) did not make PostgreSQL pick that plan, and the benchmark needs minutes, so this test
checks the setting on a real connection of the app's engine; the benchmark shows its effect.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from service.storage.db import make_engine
from tests.conftest import PG_URL

pytestmark = pytest.mark.postgres


async def test_postgres_connections_plan_each_statement_with_its_parameters() -> None:
    engine = make_engine(PG_URL)
    try:
        async with engine.connect() as conn:
            mode = (await conn.execute(text("SHOW plan_cache_mode"))).scalar_one()
    finally:
        await engine.dispose()
    assert mode == "force_custom_plan"
