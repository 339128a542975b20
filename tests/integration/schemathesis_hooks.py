"""Schemathesis hooks for test_api_fuzz.py (loaded through SCHEMATHESIS_HOOKS): how to put generated rows on
the wire as NDJSON, the upload's media type, which schemathesis does not know."""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: Any, value: Any) -> bytes:
    rows = value if isinstance(value, list) else [value]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()
