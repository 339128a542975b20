"""A/B experiments on live traffic: sticky assignment, sequential decisions, automatic promote/rollback.

The statistics live in `monitoring.experiments` (GrowthBook-style hashing, SRM, asymptotic confidence
sequences, Holm, Thompson sampling); this module owns the lifecycle: validate and start an experiment
(load its adapters through `Serving`), route traffic to it, gather per-variant data from the completion log
and feedback, decide on every tick of the monitor loop, and act (promote through the zero-downtime swap,
or roll back by ending the experiment and keeping production). Every decision is an event with numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from monitoring import metrics
from monitoring.experiments import (
    Decision,
    Guardrail,
    Policy,
    VariantData,
    decide,
    ramp_weights,
    summarize,
    thompson_weights,
)
from service.core.adapter_deletion import hold
from service.core.routing import BASE_NAME, ExperimentRoute, Router, Target, Variant
from service.core.serving import Serving
from service.errors import Conflict, NotFound, Unprocessable, convert_or_422, fields_under
from service.storage.models import Adapter, Completion, Deployment, Experiment, ExperimentEvent, Feedback

log = logging.getLogger("tuneloop.experiments")
ACTIVE = ("pending", "running")
EXPERIMENT_FIELDS = frozenset({"deployment", "variants", "goal", "guardrails", "policy", "seed"})


class Goal(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    metric: Literal["rating"] = "rating"


class ExperimentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An experiment of a new adapter against production (the variants are made for it)."""

    goal: Goal | None = None
    guardrails: list[Guardrail] | None = None
    policy: Policy | None = None
    seed: str | int | None = None


class AutoDeploy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    experiment: Annotated[ExperimentSpec, msgspec.Meta(
        description="started (pending, then running) when the job's adapter passes its evaluation")]


def checked_auto_deploy(raw: Any) -> dict[str, Any] | None:
    """A job's `auto_deploy`, checked when the job is created: a bad experiment spec is a 422 then, not an
    experiment that fails to start after the training it waited for."""
    if raw is None:
        return None
    convert_or_422(raw, AutoDeploy, "auto_deploy")
    spec = raw["experiment"]
    with fields_under("auto_deploy.experiment"):
        parse_policy(spec.get("policy"), spec.get("guardrails"))  # the ranges the types cannot say
    return raw


def parse_policy(policy: Any, guardrails: Any) -> Policy:
    if policy is None:
        policy = {}
    if not isinstance(policy, dict):
        raise Unprocessable("policy must be an object", field="policy")
    if guardrails is not None and not isinstance(guardrails, list):
        raise Unprocessable("guardrails must be a list", field="guardrails")
    try:
        rails = tuple(Guardrail(**g) for g in guardrails or [])
        p = dict(policy)
        if "ramp" in p:
            p["ramp"] = tuple(p["ramp"] or ())
        return Policy(**p, guardrails=rails)
    except TypeError as exc:
        raise Unprocessable(f"invalid policy or guardrail field: {exc}", field="policy") from exc
    except ValueError as exc:
        field = str(exc).split(" ", 1)[0]
        raise Unprocessable(str(exc), field=field if "." in field else "policy") from exc


def experiment_json(e: Experiment, summary: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"object": "experiment", "id": e.id, "deployment": e.deployment, "status": e.status,
            "variants": e.variants, "goal": e.goal, "guardrails": e.guardrails, "policy": e.policy,
            "decision": (e.decision or {}).get("last"), "state": {k: v for k, v in (e.decision or {}).items()
                                                                 if k != "last"},
            "summary": summary, "created_at": int(e.created_at),
            "finished_at": None if e.finished_at is None else int(e.finished_at)}


async def _resolve_variants(s: AsyncSession, deployment: Deployment, raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise Unprocessable("variants must be a list of at least two {name, adapter_id, weight}", field="variants")
    out: list[dict[str, Any]] = []
    for i, v in enumerate(raw):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not v["name"]:
            raise Unprocessable("each variant needs a name", field=f"variants[{i}].name")
        weight = v.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or weight <= 0:
            raise Unprocessable("weight must be a positive number", field=f"variants[{i}].weight")
        ref = v.get("adapter_id")
        if ref is not None and not isinstance(ref, str):
            raise Unprocessable('adapter_id must be an adapter id, "production" or null (the base model)',
                                field=f"variants[{i}].adapter_id")
        is_control = ref == "production"
        adapter_id = deployment.production_adapter_id if ref == "production" else ref
        if adapter_id is not None:
            a = await hold(s, adapter_id, f"variants[{i}].adapter_id")  # a concurrent delete waits, then refuses
            if a is None or a.deployment != deployment.name:
                raise NotFound(f"adapter {adapter_id!r} does not exist for {deployment.name}",
                               field=f"variants[{i}].adapter_id")
            if a.status == "rejected" and not v.get("force"):
                raise Conflict(f"adapter {adapter_id} failed its gates and can't be deployed automatically",
                               field=f"variants[{i}].adapter_id")
        out.append({"name": v["name"], "adapter_id": adapter_id, "weight": float(weight), "is_control": is_control})
    if len({v["name"] for v in out}) != len(out):
        raise Unprocessable("variant names must be unique", field="variants")
    if not any(v["is_control"] for v in out):
        # No explicit "production" arm: the one serving production (or the first) is the control.
        idx = next((i for i, v in enumerate(out) if v["adapter_id"] == deployment.production_adapter_id), 0)
        out[idx]["is_control"] = True
    return out


class ExperimentService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], serving: Serving, router: Router) -> None:
        self.sessions = sessions
        self.serving = serving
        self.router = router
        self.targets: dict[str, dict[str, Target]] = {}  # experiment id → variant name → target
        self._lock = asyncio.Lock()
        self._unfollowable: set[str] = set()  # experiments another process started that failed to load here

    # -- create / stop --------------------------------------------------------------------------------
    async def create(self, body: Any) -> Experiment:
        if not isinstance(body, dict):
            raise Unprocessable("body must be an object")
        async with self._lock:  # not followed (loaded a second time) while it loads
            exp = await insert_experiment(self.sessions, body, status="running")
            try:
                await self._activate(exp)
            except Exception:
                async with self.sessions() as s, s.begin():
                    await s.execute(update(Experiment).where(Experiment.id == exp.id)
                                    .values(status="failed", finished_at=time.time()))
                raise
        return exp

    async def _load_targets(self, exp: Experiment) -> dict[str, Target]:
        """Every variant's target: the base model, production as it serves, or the adapter loaded."""
        targets: dict[str, Target] = {}
        try:
            for v in exp.variants:
                if v["adapter_id"] is None:
                    targets[v["name"]] = Target(BASE_NAME, None)
                    continue
                prod = self.router.production.get(exp.deployment)
                if prod is not None and prod.adapter_id == v["adapter_id"]:
                    targets[v["name"]] = prod
                    continue
                async with self.sessions() as s:
                    adapter = await s.get(Adapter, v["adapter_id"])
                assert adapter is not None
                targets[v["name"]] = await self.serving.staged_or_load(exp.deployment, adapter)
        except Exception:
            for t in targets.values():
                self.serving.retire(t)
            raise
        return targets

    async def _activate(self, exp: Experiment) -> None:
        """Start it: load its variants, record it running (only if it is still in the status read, so that
        of two API processes only one starts a pending experiment), route it."""
        targets = await self._load_targets(exp)
        state = dict(exp.decision or {})
        state.setdefault("stage", 0)
        state.setdefault("stage_started_at", time.time())
        state["weights"] = state.get("weights") or self._initial_weights(exp)
        async with self.sessions() as s, s.begin():
            started = await s.execute(update(Experiment).where(Experiment.id == exp.id, Experiment.status == exp.status)
                                      .values(status="running", decision=state))
            if started.rowcount == 1:
                s.add(ExperimentEvent(experiment_id=exp.id, type="started", data={"weights": state["weights"]}))
        if started.rowcount != 1:  # another process started (or stopped) it; `follow` routes what it did
            for t in targets.values():
                self.serving.retire(t)
            return
        self.targets[exp.id] = targets
        exp.decision, exp.status = state, "running"
        self._route(exp, state["weights"])

    async def follow(self) -> None:
        """Route the experiments another API process started, re-weighted or stopped (see
        `service.core.replicas`): the database's running experiments are what this process routes."""
        if not self.serving.pool.ready:
            return
        async with self._lock:
            async with self.sessions() as s:
                running = {e.id: e for e in (await s.execute(
                    select(Experiment).where(Experiment.status == "running"))).scalars()}
            for exp_id in [e for e in self.targets if e not in running]:
                self._unroute(exp_id)
            for exp in running.values():
                weights = (exp.decision or {}).get("weights") or self._initial_weights(exp)
                if exp.id not in self.targets:
                    try:
                        self.targets[exp.id] = await self._load_targets(exp)
                    except Exception:
                        if exp.id not in self._unfollowable:  # logged once, retried every pass
                            self._unfollowable.add(exp.id)
                            log.exception("following experiment %s failed; retried at every pass", exp.id)
                        continue
                    self._unfollowable.discard(exp.id)  # a later failure is news again
                    log.info("%s: followed experiment %s", exp.deployment, exp.id)
                elif (route := self.router.experiments.get(exp.deployment)) is not None \
                        and route.experiment_id == exp.id and [v.weight for v in route.variants] == weights:
                    continue
                self._route(exp, weights)

    def _initial_weights(self, exp: Experiment) -> list[float]:
        policy = Policy(**{**exp.policy, "ramp": tuple(exp.policy.get("ramp") or ()), "guardrails": ()})
        if policy.ramp:
            n_treat = len(exp.variants) - 1
            ramp = ramp_weights(policy, 0, n_treat)
            controls = [i for i, v in enumerate(exp.variants) if v["is_control"]]
            out, t = [], 1
            for i in range(len(exp.variants)):
                out.append(ramp[0] if i in controls else ramp[t])
                t += 0 if i in controls else 1
            return out
        total = sum(v["weight"] for v in exp.variants)
        return [v["weight"] / total for v in exp.variants]

    def _route(self, exp: Experiment, weights: list[float]) -> None:
        targets = self.targets[exp.id]
        self.router.set_experiment(exp.deployment, ExperimentRoute(exp.id, exp.seed, tuple(
            Variant(v["name"], targets[v["name"]], w) for v, w in zip(exp.variants, weights, strict=True))))
        for v, w in zip(exp.variants, weights, strict=True):
            metrics.EXPERIMENT_WEIGHT.labels(exp.deployment, v["name"]).set(w)

    async def stop(self, experiment_id: str, status: str = "stopped", reason: str = "stopped via API",
                   numbers: dict[str, Any] | None = None) -> Experiment:
        async with self._lock:
            return await self._stop(experiment_id, status, reason, numbers)

    async def _stop(self, experiment_id: str, status: str, reason: str,
                    numbers: dict[str, Any] | None = None) -> Experiment:
        exp = await self.get(experiment_id)
        if exp.status not in ACTIVE:
            raise Conflict(f"experiment {experiment_id} is already {exp.status}")
        self._unroute(exp.id)
        async with self.sessions() as s, s.begin():
            stopped = await s.execute(update(Experiment).where(Experiment.id == exp.id, Experiment.status.in_(ACTIVE))
                                      .values(status=status, finished_at=time.time()))
            if stopped.rowcount == 1:
                s.add(ExperimentEvent(experiment_id=exp.id, type=status, data={"reason": reason, **(numbers or {})}))
        if stopped.rowcount != 1:
            exp = await self.get(experiment_id)
            raise Conflict(f"experiment {experiment_id} is already {exp.status}")
        return await self.get(experiment_id)

    def _unroute(self, experiment_id: str) -> None:
        """Stop routing to an experiment; its variants' adapters drain and unload."""
        for deployment, route in list(self.router.experiments.items()):
            if route.experiment_id == experiment_id:
                self.router.set_experiment(deployment, None)
        for t in self.targets.pop(experiment_id, {}).values():
            self.serving.retire(t)

    # -- read -----------------------------------------------------------------------------------------
    async def get(self, experiment_id: str) -> Experiment:
        async with self.sessions() as s:
            exp = await s.get(Experiment, experiment_id)
        if exp is None:
            raise NotFound(f"experiment {experiment_id!r} does not exist")
        return exp

    async def list(self, deployment: str | None) -> list[Experiment]:
        q = select(Experiment).order_by(Experiment.created_at.desc())
        if deployment:
            q = q.where(Experiment.deployment == deployment)
        async with self.sessions() as s:
            return list((await s.execute(q)).scalars())

    async def events(self, experiment_id: str) -> list[ExperimentEvent]:
        async with self.sessions() as s:
            return list((await s.execute(select(ExperimentEvent).where(ExperimentEvent.experiment_id == experiment_id)
                                         .order_by(ExperimentEvent.id))).scalars())

    async def variant_data(self, exp: Experiment) -> list[VariantData]:
        """Per-variant counts and outcomes from the completion log and its feedback."""
        state = exp.decision or {}
        stage_start = float(state.get("stage_started_at", exp.created_at))
        weights = state.get("weights") or [v["weight"] for v in exp.variants]
        async with self.sessions() as s:
            comps = (await s.execute(select(Completion.id, Completion.variant, Completion.user, Completion.error,
                                            Completion.latency_seconds, Completion.completion_tokens,
                                            Completion.created_at).where(Completion.experiment_id == exp.id))).all()
            ratings = (await s.execute(select(Completion.variant, Feedback.rating)
                                       .join(Feedback, Feedback.completion_id == Completion.id)
                                       .where(Completion.experiment_id == exp.id, Feedback.rating.is_not(None)))).all()
        out = []
        for v, w in zip(exp.variants, weights, strict=True):
            mine = [c for c in comps if c.variant == v["name"]]
            out.append(VariantData(
                name=v["name"], is_control=v["is_control"], weight=float(w),
                ratings=np.array([r for name, r in ratings if name == v["name"]], dtype=float),
                errors=sum(1 for c in mine if c.error), requests=len(mine),
                latencies=np.array([c.latency_seconds for c in mine], dtype=float),
                output_tokens=np.array([c.completion_tokens for c in mine], dtype=float),
                # SRM compares units assigned under the current weights (the current ramp stage)
                units=len({c.user for c in mine if c.user and c.created_at >= stage_start})))
        return out

    async def summary(self, exp: Experiment) -> dict[str, Any]:
        if exp.summary is not None:  # frozen: its completions may be pruned
            return exp.summary
        data = await self.variant_data(exp)
        return summarize(data, _policy(exp))

    async def freeze_finished(self, deployment: str, before: float) -> list[str]:
        """Store the statistics, computed from the full completion log, of the deployment's experiments that
        finished before `before`; the ids newly frozen. Completion retention may then prune their completions:
        feedback on them is closed by then (`FeedbackService`), so the numbers are final."""
        async with self.sessions() as s:
            finished = list((await s.execute(select(Experiment).where(
                Experiment.deployment == deployment, Experiment.finished_at < before,
                Experiment.summary.is_(None)))).scalars())
        for exp in finished:
            summary = _jsonable(await self.summary(exp))
            async with self.sessions() as s, s.begin():
                await s.execute(update(Experiment).where(Experiment.id == exp.id).values(summary=summary))
        return [e.id for e in finished]

    # -- the decision loop ----------------------------------------------------------------------------
    async def restore(self) -> None:
        """At start: route every running experiment again (adapters load when vLLM is ready)."""
        from service.core.serving import fresh_name

        async with self.sessions() as s:
            running = list((await s.execute(select(Experiment).where(Experiment.status == "running"))).scalars())
            for exp in running:
                targets = {}
                for v in exp.variants:
                    a = await s.get(Adapter, v["adapter_id"]) if v["adapter_id"] else None
                    targets[v["name"]] = Target(BASE_NAME, None) if a is None else \
                        Target(fresh_name(exp.deployment, a.id), a.id, a.path)
                self.targets[exp.id] = targets
                self._route(exp, (exp.decision or {}).get("weights") or self._initial_weights(exp))

    async def tick(self) -> None:
        async with self._lock:
            async with self.sessions() as s:
                active = list((await s.execute(select(Experiment).where(Experiment.status.in_(ACTIVE))
                                               .order_by(Experiment.created_at))).scalars())
            running_deps = {e.deployment for e in active if e.status == "running"}
            for exp in active:
                try:
                    if exp.status == "pending":
                        if exp.deployment not in running_deps and self.serving.pool.ready:
                            await self._activate(exp)
                            running_deps.add(exp.deployment)
                        continue
                    if exp.id not in self.targets:
                        continue
                    await self._decide(exp)
                except Exception:
                    log.exception("experiment %s tick failed", exp.id)

    async def _decide(self, exp: Experiment) -> None:
        policy = _policy(exp)
        data = await self.variant_data(exp)
        decision = decide(data, policy, time.time() - exp.created_at)
        summary = summarize(data, policy)
        self._export(exp, summary, decision)
        state = dict(exp.decision or {})
        last = state.get("last") or {}
        state["last"] = {"action": decision.action, "winner": decision.winner, "reason": decision.reason,
                         "apply": decision.apply, "at": time.time()}
        changed = (last.get("action"), last.get("reason")) != (decision.action, decision.reason)
        if policy.mode == "thompson" and decision.action == "continue":
            state["weights"] = thompson_weights(data, floor=policy.thompson_floor)
            self._route(exp, state["weights"])
        elif policy.ramp and decision.action == "continue":
            self._maybe_advance_ramp(exp, policy, data, state)
        async with self.sessions() as s, s.begin():
            await s.execute(update(Experiment).where(Experiment.id == exp.id).values(decision=state))
            if changed:
                s.add(ExperimentEvent(experiment_id=exp.id, type=f"decision:{decision.action}",
                                      data={"reason": decision.reason, "winner": decision.winner,
                                            "apply": decision.apply, "numbers": _jsonable(decision.numbers)}))
        exp.decision = state
        if changed:
            metrics.EXPERIMENT_DECISIONS.labels(exp.deployment, decision.action).inc()
        await self._act(exp, decision)

    def _maybe_advance_ramp(self, exp: Experiment, policy: Policy, data: list[VariantData],
                            state: dict[str, Any]) -> None:
        stage = int(state.get("stage", 0))
        if stage + 1 >= len(policy.ramp):
            return
        need = max(policy.guardrail_min_samples, policy.min_samples_per_variant // len(policy.ramp))
        if all(d.requests >= need for d in data) and not any(
                g["status"] == "tripped" for g in (state["last"] or {}).get("guardrails", [])):
            state["stage"] = stage + 1
            state["stage_started_at"] = time.time()
            n_treat = len(exp.variants) - 1
            ramp = ramp_weights(policy, stage + 1, n_treat)
            weights, t = [], 1
            for v in exp.variants:
                if v["is_control"]:
                    weights.append(ramp[0])
                else:
                    weights.append(ramp[t])
                    t += 1
            state["weights"] = weights
            self._route(exp, weights)

    async def _act(self, exp: Experiment, decision: Decision) -> None:
        if decision.action == "promote" and decision.apply:
            winner = next(v for v in exp.variants if v["name"] == decision.winner)
            prod = self.router.production.get(exp.deployment)
            if (prod.adapter_id if prod else None) != winner["adapter_id"]:
                # Promote while the experiment still routes to the winner, so the swap reuses the winner's
                # loaded target; stopping afterwards unloads only the losers.
                try:
                    await self.serving.promote(exp.deployment, winner["adapter_id"], force=False,
                                               reason=f"experiment {exp.id}: {decision.reason}")
                except Exception as exc:
                    await self._stop(exp.id, "failed", f"promoting {decision.winner} failed: {exc}")
                    raise
            await self._stop(exp.id, "promoted", decision.reason, {"winner": decision.winner})
        elif decision.action == "rollback" and decision.apply:
            await self._stop(exp.id, "rolled_back", decision.reason)
            await _reject_losers(self.sessions, exp)
        elif decision.action == "stop_inconclusive":
            await self._stop(exp.id, "inconclusive", decision.reason)

    def _export(self, exp: Experiment, summary: dict[str, Any], decision: Decision) -> None:
        for v in summary.get("variants", []):
            name = v.get("name")
            rating = v.get("mean_rating")
            lower, upper = v.get("mean_rating_ci") or (None, None)
            for stat, value in (("mean", rating), ("lower", lower), ("upper", upper)):
                if isinstance(value, int | float):
                    metrics.EXPERIMENT_RATING.labels(exp.deployment, name, stat).set(value)
        srm = summary.get("srm_pvalue")
        if isinstance(srm, int | float):
            metrics.EXPERIMENT_SRM_PVALUE.labels(exp.deployment).set(srm)


def _policy(exp: Experiment) -> Policy:
    return Policy(**{**exp.policy, "ramp": tuple(exp.policy.get("ramp") or ()),
                     "guardrails": tuple(Guardrail(**g) for g in exp.guardrails or [])})


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: None if isinstance(o, float) else str(o)))


async def _reject_losers(sessions: async_sessionmaker[AsyncSession], exp: Experiment) -> None:
    ids = [v["adapter_id"] for v in exp.variants if not v["is_control"] and v["adapter_id"]]
    async with sessions() as s, s.begin():
        await s.execute(update(Adapter).where(Adapter.id.in_(ids), Adapter.status == "candidate")
                        .values(status="retired"))


async def insert_experiment(sessions: async_sessionmaker[AsyncSession], body: dict[str, Any],
                            status: str) -> Experiment:
    """Validate and store an experiment (`running` from the API, `pending` from auto-deploy)."""
    unknown = sorted(set(body) - EXPERIMENT_FIELDS)
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    goal = body.get("goal") or {"metric": "rating"}
    if not isinstance(goal, dict) or goal.get("metric", "rating") != "rating":
        raise Unprocessable('goal.metric must be "rating"', field="goal.metric")
    policy = parse_policy(body.get("policy"), body.get("guardrails"))
    async with sessions() as s, s.begin():
        dep = await s.get(Deployment, body.get("deployment")) if isinstance(body.get("deployment"), str) else None
        if dep is None:
            raise NotFound(f"deployment {body.get('deployment')!r} does not exist", field="deployment")
        if status == "running":
            busy = (await s.execute(select(Experiment.id).where(Experiment.deployment == dep.name,
                                                                Experiment.status == "running"))).first()
            if busy:
                raise Conflict(f"deployment {dep.name} already runs experiment {busy[0]}", field="deployment")
        variants = await _resolve_variants(s, dep, body.get("variants"))
        if policy.mode == "thompson" and len(variants) < 3:
            log.info("thompson mode with two variants: allowed, though fixed mode is the usual choice")
        exp_id = "exp-" + uuid.uuid4().hex[:16]
        pol = asdict(policy)
        pol.pop("guardrails")
        pol["ramp"] = list(pol["ramp"])
        exp = Experiment(id=exp_id, deployment=dep.name, status=status, seed=str(body.get("seed") or exp_id),
                         variants=variants, goal=goal, guardrails=[asdict(g) for g in policy.guardrails],
                         policy=pol, decision={})
        s.add(exp)
        await s.flush()
        s.add(ExperimentEvent(experiment_id=exp_id, type="created", data={"status": status}))
    return exp


async def request_auto_experiment(sessions: async_sessionmaker[AsyncSession], adapter: Adapter,
                                  spec: dict[str, Any]) -> str:
    """Called by the worker after a passed evaluation: candidate vs production, started by the API loop."""
    exp_spec = dict(spec.get("experiment") or {})
    body = {"deployment": adapter.deployment,
            "variants": [{"name": "production", "adapter_id": "production", "weight": 0.5},
                         {"name": f"v{adapter.version}", "adapter_id": adapter.id, "weight": 0.5}],
            **{k: v for k, v in exp_spec.items() if k in ("goal", "guardrails", "policy", "seed")}}
    exp = await insert_experiment(sessions, body, status="pending")
    return exp.id
