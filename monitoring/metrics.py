"""Every Prometheus metric tuneloop exports, declared once.

Names: prefix `tuneloop_`, base units, counters end in `_total`. Labels are bounded: deployment, adapter,
variant, group, feature, attribute, metric, state — never user ids or prompts. Gauges that describe
database state (jobs by state, experiment statistics, drift) are refreshed by the service's monitor loop,
so every API process reports the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)


class DatabaseCounter(Collector):
    """A counter whose value is a count kept in the database (finished jobs, evaluations).

    Jobs finish in the worker process, which nobody scrapes; the API process's monitor loop reads the
    counts from the database and sets them here, so every API replica exports the same monotonic totals.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name.removesuffix("_total"), documentation, list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def set_all(self, values: dict[tuple[str, ...], float]) -> None:
        self._values = dict(values)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in sorted(self._values.items()):
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# --- serving -------------------------------------------------------------------------------------------
REQUESTS = Counter("tuneloop_requests_total", "Gateway requests by outcome.",
                   ["deployment", "adapter", "variant", "status"], registry=REGISTRY)
REQUEST_ERRORS = Counter("tuneloop_request_errors_total", "Gateway requests that failed (4xx from vLLM, 5xx, 503).",
                         ["deployment", "adapter", "variant", "reason"], registry=REGISTRY)
REQUEST_DURATION = Histogram("tuneloop_request_duration_seconds", "Gateway request latency, end to end.",
                             ["deployment", "adapter", "variant"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
TOKENS = Counter("tuneloop_tokens_total", "Tokens processed by the gateway.",
                 ["deployment", "adapter", "variant", "direction"], registry=REGISTRY)
VLLM_UP = Gauge("tuneloop_vllm_up", "1 when every vLLM server behind the gateway is ready.", registry=REGISTRY)
MONITOR_LEADER = Gauge("tuneloop_monitor_leader", "1 in the one API process (of those sharing a database) whose "
                       "monitor decides experiments and runs drift, fairness and triggers.", registry=REGISTRY)
VLLM_RESTARTS = Counter("tuneloop_vllm_restarts_total", "Restarts of the managed vLLM server.", registry=REGISTRY)
ADAPTERS_LOADED = Gauge("tuneloop_adapters_loaded", "Adapters loaded in vLLM and routable.",
                        ["deployment"], registry=REGISTRY)
ADAPTERS_DELETED = Counter("tuneloop_adapters_deleted_total",
                           "Adapters deleted, through the API (api) or by a deployment's keep_adapters policy.",
                           ["deployment", "kind"], registry=REGISTRY)
SNAPSHOTS_DELETED = Counter("tuneloop_snapshots_deleted_total",
                            "Snapshots deleted, through the API (api) or by a deployment's keep_snapshots policy.",
                            ["deployment", "kind"], registry=REGISTRY)
COMPLETIONS_PRUNED = Counter("tuneloop_completions_pruned_total",
                             "Logged completions deleted by the retention (TUNELOOP_COMPLETION_RETENTION_DAYS).",
                             ["deployment"], registry=REGISTRY)

# --- feedback ------------------------------------------------------------------------------------------
FEEDBACK = Counter("tuneloop_feedback_total", "Feedback items stored.",
                   ["deployment", "adapter", "variant", "kind"], registry=REGISTRY)
FEEDBACK_RATING = Histogram("tuneloop_feedback_rating", "Ratings received (0..1).",
                            ["deployment", "adapter", "variant"],
                            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), registry=REGISTRY)
DATASET_ROWS = Counter("tuneloop_dataset_rows_total", "Dataset rows received by outcome.",
                       ["deployment", "outcome"], registry=REGISTRY)

# --- training and evaluation (set by the API's monitor loop from the database) --------------------------
JOBS = Gauge("tuneloop_jobs", "Jobs by kind and state.", ["kind", "state"], registry=REGISTRY)
JOBS_FINISHED = DatabaseCounter("tuneloop_jobs_finished_total", "Finished jobs by outcome.", ["kind", "state"],
                                REGISTRY)
JOB_DURATION = Gauge("tuneloop_job_last_duration_seconds", "Duration of the last finished job.",
                     ["deployment", "kind"], registry=REGISTRY)
TRAIN_LOSS = Gauge("tuneloop_training_last_loss", "Last training and validation loss of the latest job.",
                   ["deployment", "split"], registry=REGISTRY)
EVALUATIONS = DatabaseCounter("tuneloop_evaluations_total", "Evaluations by gate outcome.", ["deployment", "outcome"],
                              REGISTRY)
EVALUATION_METRIC = Gauge("tuneloop_evaluation_metric", "Latest evaluation metrics, candidate vs reference.",
                          ["deployment", "metric", "model"], registry=REGISTRY)

# --- experiments ---------------------------------------------------------------------------------------
EXPERIMENT_RATING = Gauge("tuneloop_experiment_rating", "Per-variant mean rating and interval bounds.",
                          ["deployment", "variant", "stat"], registry=REGISTRY)
EXPERIMENT_SRM_PVALUE = Gauge("tuneloop_experiment_srm_pvalue", "Sample-ratio-mismatch p-value.",
                              ["deployment"], registry=REGISTRY)
EXPERIMENT_WEIGHT = Gauge("tuneloop_experiment_traffic_weight", "Current traffic weight per variant.",
                          ["deployment", "variant"], registry=REGISTRY)
EXPERIMENT_DECISIONS = Counter("tuneloop_experiment_decisions_total", "Experiment decisions.",
                               ["deployment", "decision"], registry=REGISTRY)
SWAP_PHASE_SECONDS = Histogram("tuneloop_swap_phase_seconds",
                               "Time of each phase of an adapter swap: load into vLLM, probe, commit and switch.",
                               ["deployment", "phase"], buckets=_LATENCY_BUCKETS, registry=REGISTRY)
DEPLOY_EVENTS = Counter("tuneloop_deployment_changes_total", "Promotions and rollbacks.", ["deployment", "type"],
                        registry=REGISTRY)

# --- drift and fairness --------------------------------------------------------------------------------
DRIFT_SCORE = Gauge("tuneloop_drift_score", "Drift score per feature.", ["deployment", "feature", "method"],
                    registry=REGISTRY)
DRIFT_DETECTED = Gauge("tuneloop_drift_detected", "1 if the feature drifted.", ["deployment", "feature"],
                       registry=REGISTRY)
DRIFT_SHARE = Gauge("tuneloop_drift_share", "Share of drifted features.", ["deployment"], registry=REGISTRY)
FAIRNESS_GROUP_RATING = Gauge("tuneloop_fairness_group_rating", "Mean rating per group of an attribute.",
                              ["deployment", "attribute", "group"], registry=REGISTRY)
FAIRNESS_GAP = Gauge("tuneloop_fairness_gap", "Fairness gap per attribute and metric.",
                     ["deployment", "attribute", "metric"], registry=REGISTRY)
TRIGGERS = Counter("tuneloop_retrain_triggers_total", "Retraining triggers fired.", ["deployment", "reason"],
                   registry=REGISTRY)
