"""The `tuneloop` command: serve, worker, db upgrade, jobs watch.

Every flag has a `TUNELOOP_*` environment variable (flags win); see the README's settings table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from service.settings import Settings


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="state directory (TUNELOOP_DATA_DIR, default ./var)")
    p.add_argument("--database-url", help="SQLAlchemy async URL (TUNELOOP_DATABASE_URL, default SQLite in data dir)")
    p.add_argument("--base-model", help="HF dir or hub id (TUNELOOP_BASE_MODEL, default the bundled SmolLM2)")


def _settings(args: argparse.Namespace, **more: Any) -> Settings:
    return Settings.from_env(data_dir=args.data_dir, database_url=args.database_url,
                             base_model=args.base_model, **more)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneloop", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the API, a managed vLLM, the worker and the monitor")
    _common(serve)
    serve.add_argument("--host", help="bind address (TUNELOOP_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TUNELOOP_PORT, default 8000)")
    serve.add_argument("--vllm-url", action="append", dest="vllm_urls",
                       help="use this running vLLM server instead of starting one (repeatable; TUNELOOP_VLLM_URLS)")

    worker = sub.add_parser("worker", help="run a training/evaluation worker")
    _common(worker)

    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    up = db_sub.add_parser("upgrade", help="run migrations to the latest schema")
    _common(up)

    jobs = sub.add_parser("jobs", help="fine-tuning and snapshot jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    watch = jobs_sub.add_parser("watch", help="follow a job with a progress bar")
    watch.add_argument("job_id")
    watch.add_argument("--url", default=None, help="service URL (default http://TUNELOOP_HOST:TUNELOOP_PORT)")
    watch.add_argument("--api-key", default=None, help="admin key (default TUNELOOP_ADMIN_KEY)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.command == "serve":
        import uvicorn

        from service.app import create_app

        settings = _settings(args, host=args.host, port=args.port,
                             vllm_urls=tuple(args.vllm_urls) if args.vllm_urls else None)
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                    access_log=settings.access_log, timeout_graceful_shutdown=30)
        return 0
    if args.command == "worker":
        from service.worker import run_worker

        asyncio.run(run_worker(_settings(args)))
        return 0
    if args.command == "db":
        from service.storage.migrate import upgrade

        settings = _settings(args)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(settings.database)
        print(f"database at {settings.database.split('@')[-1]} is at the latest schema")
        return 0
    if args.command == "jobs":
        from service.watch import watch_job

        settings = Settings.from_env()
        url = args.url or f"http://{settings.host}:{settings.port}"
        return watch_job(url, args.job_id, args.api_key or settings.admin_key or "")
    return 2


if __name__ == "__main__":
    sys.exit(main())
