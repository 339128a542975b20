"""AppContext: everything a running API process owns, built and torn down by the app lifespan.

Routes reach it as `request.app.state.ctx`; the core services inside it know nothing of Litestar.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from adapters.base_model import model_hash, prepare_base_model, token_counter
from monitoring import metrics
from service.auth import KeyStore
from service.core.adapters import AdapterArchives
from service.core.completion_log import CompletionLog
from service.core.datasets import DatasetService
from service.core.deployments import DeploymentService
from service.core.evaluations import EvaluationService
from service.core.experiments import ExperimentService
from service.core.feedback import FeedbackService
from service.core.gateway import Gateway
from service.core.jobs import JobService
from service.core.replicas import follow_loop
from service.core.routing import BASE_NAME, Router, Target
from service.core.serving import Serving, fresh_name, routable_lora_rank
from service.settings import Settings
from service.storage import migrate
from service.storage.artifacts import ArtifactStore
from service.storage.db import make_engine, make_readonly_sessionmaker, make_sessionmaker, make_sqlite_writer
from service.storage.models import Adapter, Deployment
from service.vllm.pool import VLLMPool, VLLMRequestError
from service.vllm.supervisor import VLLMOptions, VLLMSupervisor, lora_rank_limit

log = logging.getLogger("tuneloop")


@dataclass
class AppContext:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    keys: KeyStore
    base_model_path: str
    base_model_hash: str
    router: Router
    pool: VLLMPool
    completions: CompletionLog
    deployments: DeploymentService
    gateway: Gateway
    feedback: FeedbackService
    datasets: DatasetService
    artifacts: ArtifactStore
    archives: AdapterArchives
    jobs: JobService
    evaluations: EvaluationService
    serving: Serving
    experiments: ExperimentService
    supervisor: VLLMSupervisor | None = None
    worker: asyncio.subprocess.Process | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    # -- lifecycle --------------------------------------------------------------------------------------
    @classmethod
    async def start(cls, settings: Settings) -> AppContext:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(migrate.upgrade, settings.database)
        engine = make_engine(settings.database)
        sessions = make_sessionmaker(engine)
        readonly = make_readonly_sessionmaker(engine)
        keys = KeyStore(sessions, readonly)
        if settings.admin_key:
            await keys.ensure("admin (TUNELOOP_ADMIN_KEY)", "admin", settings.admin_key)
        base_path = await asyncio.to_thread(prepare_base_model, settings.base_model, settings.data_dir)
        base_hash = await asyncio.to_thread(model_hash, Path(base_path)) if Path(base_path).is_dir() else base_path
        names: set[str] = set()
        router = Router()
        try:
            from monitoring.experiments import assign

            router.assign = assign
        except ImportError:  # pragma: no cover - statistics module not present
            pass
        completions = CompletionLog(sessions, readonly, sqlite_writer=make_sqlite_writer(settings.database))
        answer_choices: dict[str, tuple[str, ...]] = {}
        deployments = DeploymentService(sessions, base_path, names, answer_choices)
        artifacts = ArtifactStore(sessions, settings.data_dir, settings.artifacts_in_database)

        supervisor = None
        if settings.vllm_urls:
            pool = VLLMPool(list(settings.vllm_urls))
        else:
            max_rank = settings.vllm_max_lora_rank
            if (needed := lora_rank_limit(await routable_lora_rank(sessions, artifacts))) > max_rank:
                log.warning("an adapter that serves has a LoRA rank over TUNELOOP_VLLM_MAX_LORA_RANK=%d: the managed "
                            "vLLM starts with --max-lora-rank %d", max_rank, needed)
                max_rank = needed
            supervisor = VLLMSupervisor(VLLMOptions(
                model_path=base_path, max_loras=settings.vllm_max_loras, max_cpu_loras=settings.vllm_max_cpu_loras,
                max_lora_rank=max_rank, max_model_len=settings.vllm_max_model_len,
                dtype=settings.managed_vllm_dtype, kv_cache_space_gib=settings.vllm_kv_cache_gib,
                cpu_threads=settings.managed_vllm_cpu_threads,
                log_path=str(settings.data_dir / "logs" / "vllm.log")))
            pool = VLLMPool.from_supervisor(supervisor)
        max_lora_rank = supervisor.options.max_lora_rank if supervisor else None  # unknown for other servers
        gateway = Gateway(pool, router, completions, names, answer_choices, settings.max_metadata_keys,
                          settings.max_metadata_value_chars)
        feedback = FeedbackService(sessions, completions, answer_choices, settings.completion_retention_seconds)
        datasets = DatasetService(sessions, settings.data_dir, token_counter(base_path), artifacts)
        ctx = cls(settings=settings, engine=engine, sessions=sessions, keys=keys, base_model_path=base_path,
                  base_model_hash=base_hash, router=router, pool=pool, completions=completions,
                  deployments=deployments, gateway=gateway, feedback=feedback, datasets=datasets, artifacts=artifacts,
                  archives=AdapterArchives(sessions, artifacts, settings.data_dir, base_path, base_hash, max_lora_rank),
                  jobs=JobService(sessions, datasets, max_lora_rank), evaluations=EvaluationService(sessions),
                  serving=(serving := Serving(sessions, pool, router, artifacts)),
                  experiments=ExperimentService(sessions, serving, router), supervisor=supervisor)
        await deployments.ensure_default()
        swept = await datasets.sweep_abandoned_uploads()
        if swept:
            log.warning("removed %d upload(s) that never completed", swept)
        await ctx.load_routes()
        await ctx.experiments.restore()
        completions.start()
        feedback.writer.start()
        if supervisor is not None:
            supervisor.on_ready = ctx.reload_adapters
            await supervisor.start()
        else:
            ctx.tasks.append(asyncio.create_task(
                pool.health_loop(interval=1.0, on_server_ready=ctx.reload_adapters_on), name="vllm-health"))
        ctx.tasks.append(asyncio.create_task(ctx._vllm_up_loop(), name="vllm-up"))
        ctx.tasks.append(asyncio.create_task(follow_loop(ctx), name="follow"))
        if settings.start_monitor:
            from service.core.monitor import Monitor

            ctx.extras["monitor"] = Monitor(ctx)
            ctx.tasks.append(asyncio.create_task(ctx.extras["monitor"].run(), name="monitor"))
        if settings.start_worker:
            await ctx.start_worker()
            ctx.tasks.append(asyncio.create_task(ctx._keep_worker_alive(), name="worker-supervisor"))
        return ctx

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.serving.close()
        if self.worker is not None and self.worker.returncode is None:
            self.worker.terminate()
            try:
                await asyncio.wait_for(self.worker.wait(), timeout=20)
            except TimeoutError:
                self.worker.kill()
                await self.worker.wait()
        await self.completions.stop()
        await self.feedback.writer.stop()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.pool.aclose()
        await self.engine.dispose()

    async def start_worker(self) -> None:
        from service.process import parent_death_signal

        vllm_urls = self.settings.vllm_urls or ((self.supervisor.base_url,) if self.supervisor else ())
        env = {**os.environ, "TUNELOOP_DATA_DIR": str(self.settings.data_dir.resolve()),
               "TUNELOOP_DATABASE_URL": self.settings.database, "TUNELOOP_BASE_MODEL": self.settings.base_model,
               "TUNELOOP_VLLM_URLS": ",".join(vllm_urls)}
        logs = self.settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / "worker.log").open("ab") as out:
            self.worker = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service.cli", "worker", env=env, stdout=out, stderr=out,
                preexec_fn=parent_death_signal)

    async def _keep_worker_alive(self) -> None:
        """Restart the worker if it dies; its running job is re-queued by heartbeat timeout and resumes."""
        while True:
            assert self.worker is not None
            code = await self.worker.wait()
            log.warning("worker exited with %s; restarting it", code)
            await asyncio.sleep(1.0)
            await self.start_worker()

    # -- routing ----------------------------------------------------------------------------------------
    async def load_routes(self) -> None:
        """Rebuild the routing table from the database (production adapter of every deployment)."""
        async with self.sessions() as s:
            deps = list((await s.execute(select(Deployment))).scalars())
            for d in deps:
                self.deployments.remember(d)
                target = Target(BASE_NAME, None)
                if d.production_adapter_id:
                    a = await s.get(Adapter, d.production_adapter_id)
                    if a is not None:
                        target = Target(fresh_name(d.name, a.id), a.id, a.path)
                self.router.set_production(d.name, target)

    async def reload_adapters(self) -> None:
        """After the managed vLLM (re)starts, load every routable adapter before traffic resumes."""
        await self.reload_adapters_on(None)

    async def reload_adapters_on(self, server: Any) -> None:
        """Load every routable (and staged or standby) adapter on `server` (None: every server) before it takes
        traffic."""
        targets = {**self.router.routable(), **{t.served_name: t for t in self.serving.kept()}}
        refused = 0
        for name, target in targets.items():
            assert target.path is not None and target.adapter_id is not None
            try:
                path = await self.artifacts.local(target.adapter_id, target.path)
                await self.pool.load_adapter(name, path, servers=None if server is None else [server])
                self.serving.reloaded(name, ok=True)
            except VLLMRequestError as exc:
                # No answer: the server is in trouble, and the whole reload is retried. Refused by a server
                # while others serve: it stays out of the pool, as before. Refused with no other server (its
                # files are gone, say): it must not keep every other deployment from serving, so it is
                # skipped, and requests routed to it get a 503 naming it until a swap replaces it.
                if exc.status_code is None or any(s.ready for s in self.pool.servers if s is not server):
                    raise
                log.error("adapter %s (%s) cannot be loaded again; its requests fail until a promote or rollback "
                          "replaces it: %s", target.adapter_id, name, exc)
                self.serving.reloaded(name, ok=False)
                refused += 1
        log.info("vLLM ready; %d adapters loaded, %d refused", len(targets) - refused, refused)

    async def _vllm_up_loop(self) -> None:
        seen = 0
        while True:
            metrics.VLLM_UP.set(1 if self.pool.ready else 0)
            if self.supervisor is not None and self.supervisor.restart_count > seen:
                metrics.VLLM_RESTARTS.inc(self.supervisor.restart_count - seen)
                seen = self.supervisor.restart_count
            await asyncio.sleep(1.0)
