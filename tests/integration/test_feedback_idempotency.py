"""Property: however feedback is submitted and retried (single objects, batches, repeated client ids,
Idempotency-Key), each client id is stored (and counted in Prometheus) exactly once and always maps to the
same stored id.
Runs the real FeedbackService on a real SQLite file and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select

from monitoring import metrics
from service.core.completion_log import CompletionLog
from service.core.feedback import FeedbackService
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Completion, Feedback
from tests.conftest import PG_URL, _reset_pg

COMPLETIONS = [f"chatcmpl-prop-{i}" for i in range(3)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated real SQLite file or the real PostgreSQL `test` database, with three completions."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fb') / 'tuneloop.db'}"
    else:
        _reset_pg()
        url = PG_URL
    upgrade(url)

    async def seed() -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.execute(insert(Completion), [{
                "id": c, "deployment": "default", "adapter": "base", "kind": "chat", "attributes": {},
                "prompt": [{"role": "user", "content": "hi"}], "prompt_hash": "h", "output": "o",
                "created_at": time.time()} for c in COMPLETIONS])
        await engine.dispose()

    asyncio.run(seed())
    return url

submission = st.tuples(st.sampled_from("abcde"), st.sampled_from(COMPLETIONS),
                       st.floats(min_value=0, max_value=1, allow_nan=False), st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(submission, min_size=1, max_size=10), st.integers(min_value=1, max_value=4),
       st.integers(min_value=1, max_value=3))
def test_retries_never_store_twice(db_url: str, items, batch: int, retries: int) -> None:
    prefix = uuid.uuid4().hex[:8]

    labels = {"deployment": "default", "adapter": "base", "variant": "", "kind": "rating"}

    def counted() -> float:
        return metrics.REGISTRY.get_sample_value("tuneloop_feedback_total", labels) or 0.0

    async def run() -> None:
        before = counted()
        engine = make_engine(db_url)
        sessions = make_sessionmaker(engine)
        svc = FeedbackService(sessions, CompletionLog(sessions))
        seen: dict[str, int] = {}
        try:
            for _ in range(retries):
                for start in range(0, len(items), batch):
                    chunk = items[start:start + batch]
                    if len(chunk) == 1 and chunk[0][3]:  # a single object keyed by the Idempotency-Key header
                        key, cid, rating, _ = chunk[0]
                        ids = await svc.submit({"completion_id": cid, "rating": rating}, f"{prefix}-{key}")
                        keys = [f"{prefix}-{key}"]
                    else:
                        body = [{"id": f"{prefix}-{k}", "completion_id": c, "rating": r} for k, c, r, _ in chunk]
                        ids = await svc.submit(body, None)
                        keys = [b["id"] for b in body]
                    for k, i in zip(keys, ids, strict=True):
                        assert seen.setdefault(k, i) == i  # the same client id always answers the same row
            async with svc.sessions() as s:
                stored = (await s.execute(select(func.count()).select_from(Feedback)
                                          .where(Feedback.client_id.like(f"{prefix}-%")))).scalar_one()
            assert stored == len(seen)
            assert counted() - before == len(seen)  # the Prometheus counter counts rows, not retries
        finally:
            await engine.dispose()

    asyncio.run(run())
