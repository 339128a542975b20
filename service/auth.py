"""API keys and scope guards.

Keys are random 256-bit tokens shown once at creation; only their SHA-256 is stored (a slow password hash
buys nothing for keys of this entropy). Scopes: `app` (inference, feedback, data upload) and `admin` (all).
"""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.errors import Forbidden, Unauthorized, Unprocessable
from service.storage.models import ApiKey

SCOPES = ("app", "admin")
_CACHE_TTL = 30.0


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "tl-" + secrets.token_urlsafe(32)


class KeyStore:
    """Looks up keys by hash with a short positive cache, so auth costs no DB round trip per request."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 readonly: async_sessionmaker[AsyncSession] | None = None) -> None:
        self._sessions = sessions
        self._readonly = readonly or sessions
        self._cache: dict[str, tuple[str, float]] = {}

    async def scope_of(self, key: str) -> str | None:
        digest = hash_key(key)
        hit = self._cache.get(digest)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        async with self._readonly() as s:
            row = (await s.execute(select(ApiKey).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None)))
                   ).scalar_one_or_none()
        if row is None:
            self._cache.pop(digest, None)
            return None
        self._cache[digest] = (row.scope, time.monotonic() + _CACHE_TTL)
        return row.scope

    async def create(self, name: str, scope: str, key: str | None = None) -> tuple[ApiKey, str]:
        if scope not in SCOPES:
            raise Unprocessable(f"scope must be one of {', '.join(SCOPES)}", field="scope")
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise Unprocessable("name must be 1..200 characters", field="name")
        key = key or new_key()
        async with self._sessions() as s, s.begin():
            row = ApiKey(id="key-" + uuid.uuid4().hex[:20], name=name, scope=scope, key_hash=hash_key(key))
            s.add(row)
        return row, key

    async def ensure(self, name: str, scope: str, key: str) -> None:
        """Seed a key (TUNELOOP_ADMIN_KEY) idempotently."""
        if await self.scope_of(key) is None:
            await self.create(name, scope, key)


def _bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized()
    return token.strip()


async def _require(connection: ASGIConnection[Any, Any, Any, Any], needed: str) -> None:
    keys: KeyStore = connection.app.state.ctx.keys
    scope = await keys.scope_of(_bearer(connection))
    if scope is None:
        raise Unauthorized()
    if needed == "admin" and scope != "admin":
        raise Forbidden("this endpoint needs an admin key")
    connection.scope.setdefault("state", {})["key_scope"] = scope


async def app_scope(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "app")


async def admin_scope(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    await _require(connection, "admin")
