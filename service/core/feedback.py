"""Feedback on logged completions: validated, idempotent, durable.

A batch is all-or-nothing: every item is checked (shape, rating range, completion id) before anything is
stored, so a 422 lists every bad index and stores nothing. A client `id` (or the `Idempotency-Key`
header) makes retries safe: the unique `client_id` column guarantees one row per id even under races.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.curation.feedback_rows import FeedbackItem
from monitoring import metrics
from service.core.completion_log import CompletionLog, CompletionRef
from service.core.group_commit import GroupCommit
from service.errors import Gone, NotFound, Unprocessable
from service.storage.models import Completion, Feedback

MAX_BATCH = 1000
FEEDBACK_MARGIN = 3600.0  # seconds between the end of a completion's feedback window and its prune
MAX_TEXT = 100_000
FEEDBACK_FIELDS = frozenset({"completion_id", "rating", "correction", "comment", "attributes", "id"})


@dataclass(frozen=True)
class FeedbackIn:
    completion_id: str
    rating: float | None
    correction: str | None
    comment: str | None
    attributes: dict[str, str]
    client_id: str | None


def _validate(item: Any, prefix: str) -> tuple[FeedbackIn | None, list[dict[str, str]]]:
    errs: list[dict[str, str]] = []

    def bad(field: str, message: str) -> None:
        errs.append({"field": f"{prefix}{field}", "message": message})

    if not isinstance(item, dict):
        bad("", "each feedback item must be an object")
        return None, errs
    unknown = set(item) - FEEDBACK_FIELDS
    if unknown:
        bad(min(unknown), f"unknown field(s): {', '.join(sorted(unknown))}")
    cid = item.get("completion_id")
    if not isinstance(cid, str) or not cid:
        bad("completion_id", "completion_id is required (the id returned by the gateway)")
    rating = item.get("rating")
    if rating is not None and (isinstance(rating, bool) or not isinstance(rating, int | float)
                               or not math.isfinite(rating) or not 0 <= rating <= 1):
        bad("rating", "rating must be a number in [0, 1]")
    correction = item.get("correction")
    if correction is not None and (not isinstance(correction, str) or not correction.strip()
                                   or len(correction) > MAX_TEXT):
        bad("correction", f"correction must be a non-empty string of at most {MAX_TEXT} characters")
    if rating is None and correction is None:
        bad("rating", "at least one of rating or correction is required")
    comment = item.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_TEXT):
        bad("comment", "comment must be a string")
    attrs = item.get("attributes") or {}
    if not isinstance(attrs, dict) or len(attrs) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 128 for k, v in attrs.items()):
        bad("attributes", "attributes must be at most 16 string keys (≤64 chars) with string values (≤128 chars)")
    client_id = item.get("id")
    if client_id is not None and (not isinstance(client_id, str) or not 0 < len(client_id) <= 200):
        bad("id", "id must be a string of 1..200 characters")
    if errs:
        return None, errs
    return FeedbackIn(cid, None if rating is None else float(rating), correction, comment, dict(attrs), client_id), []


def feedback_json(f: Feedback) -> dict[str, Any]:
    return {"object": "feedback", "id": f.id, "client_id": f.client_id, "completion_id": f.completion_id,
            "deployment": f.deployment, "rating": f.rating, "correction": f.correction, "comment": f.comment,
            "attributes": f.attributes, "created_at": f.created_at}


def _refuse_unknown(parsed: list[FeedbackIn], known: Collection[str], single: bool) -> None:
    """404 (a batch: 422 naming each item) when feedback names a completion that is not in `known`."""
    missing = [i for i, f in enumerate(parsed) if f.completion_id not in known]
    if not missing:
        return
    if single:
        raise NotFound(f"completion {parsed[0].completion_id!r} does not exist", field="completion_id")
    raise Unprocessable(f"{len(missing)} item(s) refer to unknown completions; nothing was stored",
                        field=f"[{missing[0]}].completion_id",
                        errors=[{"index": i, "field": f"[{i}].completion_id",
                                 "message": f"unknown completion {parsed[i].completion_id!r}"} for i in missing])


class FeedbackService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], completions: CompletionLog,
                 answer_choices: dict[str, tuple[str, ...]] | None = None, retention_seconds: float | None = None) -> None:
        self.sessions = sessions
        self.completions = completions
        # Feedback on a completion is accepted until an hour before the retention may prune it, so that no
        # feedback insert races the delete of its completion (service.core.retention).
        self.retention = retention_seconds
        # Shared with the deployments: a correction must be an answer its deployment can give.
        self.answer_choices = answer_choices if answer_choices is not None else {}
        # Concurrent posts share one transaction and one fsync; each waits for its own commit.
        self.writer: GroupCommit[tuple[list[FeedbackIn], dict[str, CompletionRef]], list[tuple[int, bool]]] = \
            GroupCommit(sessions, self._apply)

    async def submit(self, body: Any, idempotency_key: str | None) -> list[int]:
        single = isinstance(body, dict)
        items = [body] if single else body
        if not isinstance(items, list) or not items:
            raise Unprocessable("the body must be a feedback object or a non-empty array of them")
        if len(items) > MAX_BATCH:
            raise Unprocessable(f"at most {MAX_BATCH} feedback items per request, got {len(items)}")
        parsed: list[FeedbackIn] = []
        errors: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            if idempotency_key and isinstance(item, dict) and "id" not in item:
                item = {**item, "id": idempotency_key if single else f"{idempotency_key}:{i}"}
            fb, errs = _validate(item, "" if single else f"[{i}].")
            if errs:
                errors.extend({**e, "index": i} for e in errs)
            else:
                assert fb is not None
                parsed.append(fb)
        if errors:
            raise Unprocessable(f"{len({e['index'] for e in errors})} invalid feedback item(s); nothing was stored",
                                field=errors[0]["field"], errors=errors)
        found = await self.completions.refs({f.completion_id for f in parsed})
        _refuse_unknown(parsed, found.keys(), single)
        if self.retention is not None:
            closed_before = time.time() - self.retention + FEEDBACK_MARGIN
            closed = [i for i, f in enumerate(parsed) if found[f.completion_id].created_at < closed_before]
            if closed:
                message = (f"feedback closed: completions are kept {self.retention / 86400:g} days "
                           "(TUNELOOP_COMPLETION_RETENTION_DAYS) and take feedback until an hour before")
                if single:
                    raise Gone(f"completion {parsed[0].completion_id!r}: {message}", field="completion_id")
                raise Unprocessable(f"{len(closed)} item(s) refer to completions closed for feedback; nothing was "
                                    "stored", field=f"[{closed[0]}].completion_id",
                                    errors=[{"index": i, "field": f"[{i}].completion_id",
                                             "message": f"completion {parsed[i].completion_id!r}: {message}"}
                                            for i in closed])
        outside = [(i, f) for i, f in enumerate(parsed) if f.correction is not None
                   and (choices := self.answer_choices.get(found[f.completion_id].deployment))
                   and f.correction not in choices]
        if outside:
            errors = [{"index": i, "field": "correction" if single else f"[{i}].correction",
                       "message": f"correction {f.correction!r} is not one of deployment "
                                  f"{found[f.completion_id].deployment!r}'s answer_choices"} for i, f in outside]
            raise Unprocessable(f"{len(outside)} correction(s) outside the deployment's answer_choices; "
                                "nothing was stored", field=errors[0]["field"], errors=errors)
        try:
            stored = await self.writer.submit((parsed, found))
        except IntegrityError:  # a completion deleted since it was found (an erasure): its foreign key failed
            _refuse_unknown(parsed, found.keys() - await self.completions.gone(found.keys()), single)
            raise
        # Counted after the commit, and only for new rows, so retries and replays never count twice.
        for f, (_, new) in zip(parsed, stored, strict=True):
            if new:
                c = found[f.completion_id]
                labels = (c.deployment, c.adapter, c.variant or "")
                metrics.FEEDBACK.labels(*labels, "correction" if f.correction else "rating").inc()
                if f.rating is not None:
                    metrics.FEEDBACK_RATING.labels(*labels).observe(f.rating)
        return [fid for fid, _ in stored]

    async def _apply(self, s: AsyncSession,
                     batches: list[tuple[list[FeedbackIn], dict[str, CompletionRef]]]) -> list[list[tuple[int, bool]]]:
        """Store several requests' feedback in one transaction (the group commit's unit of work).

        One query finds client ids stored before, one multi-row INSERT ... RETURNING stores the rest; a
        client id repeated within the transaction maps to the row of its first occurrence. Each item comes
        back as (feedback id, whether this item created the row).
        """
        client_ids = {f.client_id for parsed, _ in batches for f in parsed if f.client_id}
        existing: dict[str, int] = {}
        if client_ids:
            rows = await s.execute(select(Feedback.client_id, Feedback.id).where(Feedback.client_id.in_(client_ids)))
            existing = {cid: fid for cid, fid in rows.all()}
        new_rows: list[dict[str, Any]] = []
        first_of: dict[str, int] = {}  # client id -> index in new_rows
        slots: list[list[int | tuple[int, bool]]] = []  # per request: stored id, or (index in new_rows, first)
        for parsed, found in batches:
            slot: list[int | tuple[int, bool]] = []
            for f in parsed:
                if f.client_id and f.client_id in existing:
                    slot.append(existing[f.client_id])
                elif f.client_id and f.client_id in first_of:
                    slot.append((first_of[f.client_id], False))
                else:
                    c = found[f.completion_id]
                    if f.client_id:
                        first_of[f.client_id] = len(new_rows)
                    slot.append((len(new_rows), True))
                    new_rows.append({"client_id": f.client_id, "completion_id": c.id, "deployment": c.deployment,
                                     "rating": f.rating, "correction": f.correction, "comment": f.comment,
                                     "attributes": {**c.attributes, **f.attributes}})
            slots.append(slot)
        new_ids: list[int] = []
        if new_rows:
            stmt = insert(Feedback).returning(Feedback.id, sort_by_parameter_order=True)
            new_ids = list((await s.execute(stmt, new_rows)).scalars())
        return [[(x, False) if isinstance(x, int) else (new_ids[x[0]], x[1]) for x in slot] for slot in slots]

    async def list(self, deployment: str | None, since: float | None, cursor: int | None,
                   limit: int) -> tuple[list[Feedback], int | None]:
        q = select(Feedback).order_by(Feedback.id).limit(limit + 1)
        if deployment:
            q = q.where(Feedback.deployment == deployment)
        if since is not None:
            q = q.where(Feedback.created_at >= since)
        if cursor is not None:
            q = q.where(Feedback.id > cursor)
        async with self.sessions() as s:
            rows = list((await s.execute(q)).scalars())
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, (rows[-1].id if more and rows else None)


async def feedback_for_training(sessions: async_sessionmaker[AsyncSession],
                                deployment: str) -> tuple[list[FeedbackItem], list[int] | None]:
    """Feedback joined to its completions, as curation input, plus the id range it covers."""
    async with sessions() as s:
        rows = (await s.execute(select(Feedback, Completion).join(Completion, Feedback.completion_id == Completion.id)
                                .where(Feedback.deployment == deployment).order_by(Feedback.id))).all()
    items = []
    for f, c in rows:
        prompt = c.prompt if c.kind == "chat" else [{"role": "user", "content": c.prompt}]
        items.append(FeedbackItem(completion_id=c.id, prompt_messages=prompt, output=c.output, rating=f.rating,
                                  correction=f.correction, attributes=f.attributes or {}))
    ids = [f.id for f, _ in rows]
    return items, ([min(ids), max(ids)] if ids else None)
