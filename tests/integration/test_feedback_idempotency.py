"""Property: however feedback is submitted and retried (single objects, batches, repeated client ids,
Idempotency-Key), each client id is stored exactly once and always maps to the same stored id.
Runs the real FeedbackService on a real SQLite file."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, func, insert, select

from service.core.feedback import FeedbackService
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Completion, Feedback

COMPLETIONS = [f"chatcmpl-prop-{i}" for i in range(3)]


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('fb') / 'tuneloop.db'}"
    upgrade(url)
    with create_engine(url.replace("+aiosqlite", "")).begin() as conn:
        conn.execute(insert(Completion), [{
            "id": c, "deployment": "default", "adapter": "base", "kind": "chat", "attributes": {},
            "prompt": [{"role": "user", "content": "hi"}], "prompt_hash": "h", "output": "o",
            "created_at": time.time()} for c in COMPLETIONS])
    return url


submission = st.tuples(st.sampled_from("abcde"), st.sampled_from(COMPLETIONS),
                       st.floats(min_value=0, max_value=1, allow_nan=False), st.booleans())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(submission, min_size=1, max_size=10), st.integers(min_value=1, max_value=4),
       st.integers(min_value=1, max_value=3))
def test_retries_never_store_twice(db_url: str, items, batch: int, retries: int) -> None:
    prefix = uuid.uuid4().hex[:8]

    async def run() -> None:
        engine = make_engine(db_url)
        svc = FeedbackService(make_sessionmaker(engine))
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
        finally:
            await engine.dispose()

    asyncio.run(run())
