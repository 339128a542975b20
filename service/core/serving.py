"""Zero-downtime adapter swaps: load → probe → route → drain → unload, one lock per deployment.

vLLM's runtime LoRA endpoints race with in-flight requests and keep prefix-cache entries across
same-named reloads, so an adapter is always loaded under a fresh served name
(`<deployment>--<adapter id>--<generation>`), made routable only after it answered a probe on every vLLM
server, and unloaded only after the requests already routed to it have finished.

The newest adapter of each deployment that passed its evaluation is loaded and probed ahead of time (staged,
not routable), so promoting it is only a commit and a routing switch, and an experiment that starts with it
takes it as loaded: the load and the probe, most of a swap's time, happen before anyone asks for it.
For the same reason the adapter that leaves production stays loaded (on standby, not routable) until the next
swap, so a rollback is only a switch too; the standby that a later swap replaces is drained and unloaded. A
restarted service loads each deployment's rollback target on standby again, from the deployment history.

Several API processes may share one database (`service.core.replicas`): served names carry a per-process
tag so that they never collide in a shared vLLM, a promote commits only if production is still what it
read (compare-and-set), and `follow_production` adopts a swap another process committed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.training.config import parent_lora_shape
from monitoring import metrics
from service.core.routing import BASE_NAME, Router, Target
from service.errors import Conflict, NotFound, Unavailable
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, Deployment, DeploymentEvent, Evaluation, Experiment
from service.vllm.pool import VLLMPool, VLLMRequestError

log = logging.getLogger("tuneloop.serving")
_PROCESS_TAG = secrets.token_hex(3)  # API processes sharing a vLLM never load under the same name
_generation = itertools.count()


def fresh_name(deployment: str, adapter_id: str) -> str:
    return f"{deployment}--{adapter_id}--g{_PROCESS_TAG}-{next(_generation)}"


def history_json(e: DeploymentEvent) -> dict[str, Any]:
    return {"object": "deployment.event", "id": e.id, "deployment": e.deployment, "type": e.type,
            "adapter_id": e.adapter_id, "previous_adapter_id": e.previous_adapter_id, "forced": e.forced,
            "reason": e.reason, "created_at": e.created_at}


async def routable_lora_rank(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore) -> int:
    """The largest LoRA rank among the adapters routable at start-up (every deployment's production and the
    variants of running experiments; 0 when none). The managed vLLM starts with at least that
    `--max-lora-rank`: with less, their reload fails, and a server that cannot reload them takes no traffic."""
    async with sessions() as s:
        ids = set((await s.execute(select(Deployment.production_adapter_id)
                                   .where(Deployment.production_adapter_id.is_not(None)))).scalars())
        for variants in (await s.execute(select(Experiment.variants).where(Experiment.status == "running"))).scalars():
            ids.update(v["adapter_id"] for v in variants or [] if v.get("adapter_id"))
        recorded = (await s.execute(select(Adapter.id, Adapter.path).where(Adapter.id.in_(ids)))).all() if ids else []
    ranks = []
    for adapter_id, path in recorded:
        try:
            ranks.append(parent_lora_shape(await artifacts.local(adapter_id, path))["lora_r"])
        except (OSError, ValueError, KeyError, TypeError):  # its files are gone: loading it fails either way
            continue
    return max(ranks, default=0)


class Serving:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], pool: VLLMPool, router: Router,
                 artifacts: ArtifactStore) -> None:
        self.sessions = sessions
        self.artifacts = artifacts
        self.pool = pool
        self.router = router
        self.locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.staged: dict[str, Target] = {}  # deployment → loaded and probed, not routable; taken by promote
        self.standby: dict[str, Target] = {}  # deployment → the previous production, loaded; taken by rollback
        self._unstageable: set[str] = set()  # adapters whose staging failed once
        self._unadoptable: set[str | None] = set()  # productions another process committed that failed to load
        self._standby_restored: set[tuple[str, str]] = set()  # (deployment, production) pairs restore looked at
        self._unloading: set[asyncio.Task[None]] = set()
        self._draining: dict[str, Target] = {}  # served name → a target retire() is draining and will unload
        self.refused: set[str] = set()  # served names vLLM refused at a reload: routed (their requests get 503)

    async def close(self) -> None:
        for t in list(self._unloading):
            t.cancel()
        await asyncio.gather(*self._unloading, return_exceptions=True)

    async def load(self, deployment: str, adapter: Adapter) -> Target:
        """Load an adapter on every vLLM server under a fresh name and probe it there."""
        if not self.pool.ready:
            raise Unavailable("vLLM is not ready; the adapter can't be loaded now")
        target = Target(fresh_name(deployment, adapter.id), adapter.id,
                        await self.artifacts.local(adapter.id, adapter.path))
        try:
            with metrics.SWAP_PHASE_SECONDS.labels(deployment, "load").time():
                await self.pool.load_adapter(target.served_name, target.path)
            try:
                with metrics.SWAP_PHASE_SECONDS.labels(deployment, "probe").time():
                    await self.pool.probe(target.served_name)
            except Exception:
                await self.pool.unload_adapter(target.served_name)
                raise
        except VLLMRequestError as exc:  # the caller's answer names why, instead of an internal error
            if exc.status_code is None:
                raise Unavailable(f"vLLM did not answer while loading adapter {adapter.id}: {exc.detail}") from exc
            raise Conflict(f"vLLM cannot serve adapter {adapter.id}: {exc}", field="adapter_id") from exc
        return target

    def loaded(self, deployment: str, adapter_id: str) -> Target | None:
        """The target already loaded, probed and routable for this adapter (an experiment's variant), if any:
        promoting it is then only a commit and a routing switch, with no second load and probe."""
        return next((t for t in self.router.routable().values() if t.adapter_id == adapter_id
                     and t.served_name.startswith(f"{deployment}--") and t.served_name not in self.refused), None)

    def reloaded(self, served_name: str, ok: bool) -> None:
        """What a reload after a vLLM (re)start did with `served_name`. A refused name stays routed, so its
        requests fail with a 503 naming it, but is never taken as loaded again: not kept on standby or staged,
        and a promote of its adapter loads it anew."""
        if ok:
            self.refused.discard(served_name)
            return
        self.refused.add(served_name)
        for role in (self.staged, self.standby):
            for deployment, target in list(role.items()):
                if target.served_name == served_name:
                    del role[deployment]

    async def stage_passed(self) -> None:
        """Keep the newest adapter of each deployment that passed its evaluation (and serves nothing yet)
        staged; unload a staged adapter that is no longer that one. Called by the API's monitor loop."""
        if not self.pool.ready:
            return
        async with self.sessions() as s:
            passed = (await s.execute(select(Adapter).join(Evaluation, Evaluation.adapter_id == Adapter.id)
                                      .where(Adapter.status == "candidate", Evaluation.status == "passed")
                                      .order_by(Adapter.version))).scalars().unique()
            newest = {a.deployment: a for a in passed}
        for deployment in set(self.staged) | set(newest):
            adapter = newest.get(deployment)
            async with self.locks[deployment]:
                staged = self.staged.get(deployment)
                wanted = adapter is not None and not self.loaded(deployment, adapter.id)
                if staged is not None and (not wanted or staged.adapter_id != adapter.id):
                    await self.pool.unload_adapter(staged.served_name)
                    del self.staged[deployment]
                if wanted and deployment not in self.staged and adapter.id not in self._unstageable:
                    try:
                        self.staged[deployment] = await self.load(deployment, adapter)
                    except Exception:  # promote will load it (and report why it can't) when asked
                        self._unstageable.add(adapter.id)
                        log.exception("%s: staging %s failed; not retried", deployment, adapter.id)
                    else:
                        log.info("%s: staged %s", deployment, self.staged[deployment].served_name)

    async def restore_standby(self) -> None:
        """Load each deployment's rollback target on standby where none is kept (after a restart: the standby
        lives in this process), once per production adapter, so the first rollback is a switch there too.
        Called by the API's monitor loop."""
        if not self.pool.ready:
            return
        wanted: list[tuple[str, str, Adapter]] = []
        async with self.sessions() as s:
            for dep in (await s.execute(select(Deployment).where(
                    Deployment.production_adapter_id.is_not(None)))).scalars():
                key = (dep.name, dep.production_adapter_id)
                if dep.name in self.standby or key in self._standby_restored:
                    continue
                self._standby_restored.add(key)
                event = await self._production_event(s, dep)
                previous = await s.get(Adapter, event.previous_adapter_id) if event and event.previous_adapter_id \
                    else None
                if previous is not None:
                    wanted.append((dep.name, dep.production_adapter_id, previous))
        for deployment, production, adapter in wanted:
            async with self.locks[deployment]:
                current = self.router.production.get(deployment)
                if deployment in self.standby or current is None or current.adapter_id != production \
                        or self.loaded(deployment, adapter.id):
                    continue  # a swap came first
                try:
                    self.standby[deployment] = await self.load(deployment, adapter)
                except Exception:  # a rollback will load it (and report why it can't) when asked
                    log.exception("%s: loading rollback target %s on standby failed", deployment, adapter.id)
                else:
                    log.info("%s: %s on standby again", deployment, self.standby[deployment].served_name)

    def kept(self) -> list[Target]:
        """Adapters loaded but not routable: staged ahead of a promote, or on standby for a rollback."""
        return [*self.staged.values(), *self.standby.values()]

    def loaded_adapter_ids(self) -> set[str]:
        """Adapters this process has loaded in vLLM: routable, staged, on standby, or draining before their unload."""
        targets = [*self.router.routable().values(), *self.kept(), *self._draining.values()]
        return {t.adapter_id for t in targets if t.adapter_id is not None}

    def _in_use(self, served_name: str) -> bool:
        return served_name in self.router.routable() or any(t.served_name == served_name for t in self.kept())

    def retire(self, target: Target) -> None:
        """Unload `target` once nothing routes to it or keeps it and its in-flight requests have drained."""
        if target.adapter_id is None:
            return

        async def drain_and_unload() -> None:
            await asyncio.sleep(0)  # let requests that already chose this target register
            if self._in_use(target.served_name):
                return
            if not await self.router.drain(target.served_name, timeout=600):
                log.warning("%s still had requests in flight after 600 s; unloading anyway", target.served_name)
            if self._in_use(target.served_name):
                return
            try:
                await self.pool.unload_adapter(target.served_name)
            except Exception:
                log.exception("unloading %s failed", target.served_name)
            self._gauge()

        self._draining[target.served_name] = target
        task = asyncio.create_task(drain_and_unload())
        task.add_done_callback(lambda _: self._draining.pop(target.served_name, None))
        self._unloading.add(task)
        task.add_done_callback(self._unloading.discard)

    def _gauge(self) -> None:
        counts: defaultdict[str, int] = defaultdict(int)
        for name in self.router.routable():
            counts[name.split("--", 1)[0]] += 1
        for dep in set(self.router.production) | set(counts):
            metrics.ADAPTERS_LOADED.labels(dep).set(counts.get(dep, 0))

    async def staged_or_load(self, deployment: str, adapter: Adapter) -> Target:
        """The staged target of this adapter if there is one (an experiment starting with it), else a fresh load.
        Taken under the deployment's lock, so staging cannot unload it at the same time."""
        async with self.locks[deployment]:
            ready = self._take_ready(deployment, adapter.id)
        return ready or await self.load(deployment, adapter)

    def _take_ready(self, deployment: str, adapter_id: str) -> Target | None:
        """This adapter's staged or standby target, taken out of its role, if it has one."""
        for role in (self.staged, self.standby):
            t = role.get(deployment)
            if t is not None and t.adapter_id == adapter_id:
                return role.pop(deployment)
        return None

    async def _adapter(self, s: AsyncSession, deployment: str, adapter_id: Any) -> Adapter:
        if not isinstance(adapter_id, str):
            raise NotFound("adapter_id must name an adapter", field="adapter_id")
        adapter = await s.get(Adapter, adapter_id)
        if adapter is None or adapter.deployment != deployment:
            raise NotFound(f"adapter {adapter_id!r} does not exist for deployment {deployment!r}", field="adapter_id")
        return adapter

    async def promote(self, deployment: str, adapter_id: Any, *, force: bool = False, reason: str = "",
                      event_type: str = "promote") -> DeploymentEvent:
        async with self.locks[deployment]:
            async with self.sessions() as s:
                dep = await s.get(Deployment, deployment)
                if dep is None:
                    raise NotFound(f"deployment {deployment!r} does not exist")
                adapter = await self._adapter(s, deployment, adapter_id) if adapter_id is not None else None
            if adapter is not None and adapter.status == "deleted":
                raise Conflict(f"adapter {adapter.id} was deleted", field="adapter_id")
            if adapter is not None and adapter.status == "rejected" and not force:
                raise Conflict(f"adapter {adapter.id} failed its evaluation gates; promote it with "
                               '"force": true to override (recorded)', field="adapter_id")
            if adapter is not None and adapter.id == dep.production_adapter_id:
                raise Conflict(f"adapter {adapter.id} already serves {deployment}", field="adapter_id")
            if adapter is None:
                new = Target(BASE_NAME, None)
            else:
                new = self.loaded(deployment, adapter.id) or self._take_ready(deployment, adapter.id) \
                    or await self.load(deployment, adapter)
            previous = dep.production_adapter_id
            switch_started = time.perf_counter()
            async with self.sessions() as s, s.begin():
                # Compare-and-set: another API process on this database may have swapped since the read.
                swapped = await s.execute(update(Deployment).where(
                    Deployment.name == deployment, Deployment.production_adapter_id.is_(None) if previous is None
                    else Deployment.production_adapter_id == previous).values(production_adapter_id=new.adapter_id))
                if swapped.rowcount != 1:
                    self.retire(new)  # unloaded unless something routes to it
                    raise Conflict(f"production of {deployment} changed while this promote loaded its adapter "
                                   "(another API process promoted); look at its history and retry")
                if previous:
                    await s.execute(update(Adapter).where(Adapter.id == previous).values(status="retired"))
                if adapter is not None and (await s.execute(update(Adapter).where(
                        Adapter.id == adapter.id, Adapter.status != "deleted").values(status="production"))).rowcount != 1:
                    self.retire(new)  # the raise rolls the whole transaction back
                    raise Conflict(f"adapter {adapter.id} was deleted while this promote loaded it", field="adapter_id")
                event = DeploymentEvent(deployment=deployment, type=event_type, adapter_id=new.adapter_id,
                                        previous_adapter_id=previous, forced=bool(force and adapter is not None
                                                                                  and adapter.status == "rejected"),
                                        reason=reason)
                s.add(event)
            old = self._switch(deployment, new, rollback_target=previous)
            metrics.SWAP_PHASE_SECONDS.labels(deployment, "commit").observe(time.perf_counter() - switch_started)
            metrics.DEPLOY_EVENTS.labels(deployment, event_type).inc()
            log.info("%s: %s → %s (%s)", deployment, old.served_name if old else None, new.served_name, event_type)
            return event

    def _switch(self, deployment: str, new: Target, *, rollback_target: str | None) -> Target | None:
        """The atomic switch (requests after it see `new`); returns the target that left production.

        When the adapter that left is the next rollback's target (it always is, unless another API process
        swapped in between) it stays loaded on standby (its in-flight requests finish meanwhile) and the
        standby it replaces is drained and unloaded."""
        old = self.router.production.get(deployment)
        self.router.set_production(deployment, new)
        replaced = self.standby.pop(deployment, None)
        if old is not None and old.adapter_id is not None:
            if old.adapter_id == rollback_target and old.served_name not in self.refused:
                self.standby[deployment] = old
            else:
                self.retire(old)
        if replaced is not None:
            self.retire(replaced)
        self._gauge()
        return old

    def know(self, deployment: str) -> None:
        """Route a deployment another API process created (to the base model until `follow_production`)."""
        if deployment not in self.router.production:
            self.router.set_production(deployment, Target(BASE_NAME, None))

    async def follow_production(self, production_in_db: dict[str, str | None]) -> None:
        """Adopt the production adapter another API process committed (`production_in_db`: deployment → its
        production adapter as just read): load it under this process's own name, switch, and keep the adapter
        that left on standby when it is the new production's rollback target."""
        if not self.pool.ready:
            return  # once vLLM is ready again, the next pass adopts it
        for deployment, production in production_in_db.items():
            current = self.router.production.get(deployment)
            if current is None or current.adapter_id == production:
                continue
            async with self.locks[deployment]:
                async with self.sessions() as s:
                    dep = await s.get(Deployment, deployment)
                    current = self.router.production.get(deployment)
                    if dep is None or current is None or current.adapter_id == dep.production_adapter_id:
                        continue  # a swap in this process came first
                    event = await self._production_event(s, dep)
                    adapter = await s.get(Adapter, dep.production_adapter_id) if dep.production_adapter_id \
                        else None
                try:
                    new = Target(BASE_NAME, None) if adapter is None else self.loaded(deployment, adapter.id) \
                        or self._take_ready(deployment, adapter.id) or await self.load(deployment, adapter)
                except Exception:
                    if dep.production_adapter_id not in self._unadoptable:  # logged once, retried every pass
                        self._unadoptable.add(dep.production_adapter_id)
                        log.exception("%s: adopting %s failed; retried at every pass", deployment,
                                      dep.production_adapter_id)
                    continue
                self._unadoptable.discard(dep.production_adapter_id)  # a later failure is news again
                self._switch(deployment, new, rollback_target=event.previous_adapter_id if event else None)
                log.info("%s: followed %s → %s (%s)", deployment, current.served_name, new.served_name,
                         event.type if event else "database")

    @staticmethod
    async def _production_event(s: AsyncSession, dep: Deployment) -> DeploymentEvent | None:
        """The event that made the current production adapter serve; its previous adapter is the rollback target."""
        if dep.production_adapter_id is None:
            return None
        return (await s.execute(select(DeploymentEvent).where(
            DeploymentEvent.deployment == dep.name, DeploymentEvent.adapter_id == dep.production_adapter_id)
            .order_by(DeploymentEvent.id.desc()).limit(1))).scalar_one_or_none()

    async def rollback(self, deployment: str, reason: str = "manual rollback") -> DeploymentEvent:
        """Serve the previous production adapter (or the base model) again."""
        async with self.sessions() as s:
            dep = await s.get(Deployment, deployment)
            if dep is None:
                raise NotFound(f"deployment {deployment!r} does not exist")
            last = await self._production_event(s, dep)
        if last is None:
            raise Conflict(f"{deployment} has no previous production to roll back to")
        target = last.previous_adapter_id
        return await self.promote(deployment, target, force=True, reason=reason, event_type="rollback")

    async def history(self, deployment: str) -> list[DeploymentEvent]:
        async with self.sessions() as s:
            if await s.get(Deployment, deployment) is None:
                raise NotFound(f"deployment {deployment!r} does not exist")
            return list((await s.execute(select(DeploymentEvent).where(DeploymentEvent.deployment == deployment)
                                         .order_by(DeploymentEvent.id))).scalars())
