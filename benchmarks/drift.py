"""Drift job cost: wall time and peak memory of ``compute_drift`` at 10k vs 10k and 100k vs 100k rows.

Each case runs in a fresh subprocess so its peak RSS (``resource.getrusage``) is its own. The
baseline measured in the same subprocess is the same tabular distances computed with plain scipy
(what evidently wraps), so the ratio shows evidently's overhead; the text domain classifier is
timed as its own case because it dominates. Synthetic banking-like traffic, 7 drift columns.

    python benchmarks/drift.py            # all cases, a table on stdout
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (rows per side, text cap per side, with text)
    (10_000, 5_000, False),
    (10_000, 5_000, True),
    (10_000, 10_000, True),
    (100_000, 5_000, False),
    (100_000, 5_000, True),
]


def _frame(n: int, seed: int, shift: bool):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    intents = np.array(["card_arrival", "lost_card", "exchange_rate", "top_up", "transfer", "balance"])
    p = [0.1, 0.1, 0.2, 0.2, 0.2, 0.2] if shift else [1 / 6] * 6
    label = rng.choice(intents, n, p=p)
    filler = np.array(["please", "hi", "thanks", "urgent", "help", "hello", "quick question"])
    words = np.array(
        ["my", "card", "account", "money", "transfer", "rate", "fee", "app", "when", "why", "how"]
    )
    prompt = (
        filler[rng.integers(0, 7, n)].astype(object)
        + " "
        + label.astype(object)
        + " "
        + words[rng.integers(0, 11, n)].astype(object)
        + " "
        + words[rng.integers(0, 11, n)].astype(object)
    )
    rating = np.where(rng.random(n) < 0.4, (rng.random(n) < 0.7).astype(float), np.nan)
    return pd.DataFrame(
        {
            "prompt": prompt,
            "prompt_length": rng.normal(60 if not shift else 70, 15, n).round(),
            "answer_length": rng.gamma(4, 40, n).round(),
            "rating": rating,
            "answer_label": label,
            "empty_or_refusal": np.where(rng.random(n) < 0.03, "yes", "no"),
            "attr_segment": rng.choice(["retail", "business"], n, p=[0.8, 0.2]),
        }
    )


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(rows: int, cap: int, text: bool) -> dict:
    import evidently  # noqa: F401
    import numpy as np
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    from monitoring.drift import DriftSpec, compute_drift

    ref, cur = _frame(rows, 1, False), _frame(rows, 2, True)
    rss_before = _rss_mb()
    spec = DriftSpec.default(attribute_keys=["segment"], text=("prompt",) if text else (), text_max_rows=cap)

    t0 = time.perf_counter()
    for c in spec.numerical:  # baseline: the same tabular distances with scipy alone
        r, k = ref[c].dropna(), cur[c].dropna()
        wasserstein_distance(r, k) / max(float(np.std(r)), 0.001)
    for c in spec.categorical:
        keys = sorted(set(ref[c]) | set(cur[c]))
        pr = ref[c].value_counts(normalize=True).reindex(keys, fill_value=0)
        pc = cur[c].value_counts(normalize=True).reindex(keys, fill_value=0)
        jensenshannon(pr, pc)
    baseline = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = compute_drift(ref, cur, spec)
    seconds = time.perf_counter() - t0
    return {
        "rows": rows,
        "text": text,
        "text_cap": cap if text else None,
        "seconds": round(seconds, 3),
        "scipy_baseline_seconds": round(baseline, 4),
        "ratio_vs_baseline": round(seconds / baseline, 1),
        "rss_before_mb": round(rss_before, 1),
        "peak_rss_mb": round(_rss_mb(), 1),
        "drifted": [f.feature for f in res.features if f.drifted],
    }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DO_NOT_TRACK": "1"}
    print(
        f"{'rows/side':>10} {'text':>5} {'cap':>6} {'seconds':>8} {'scipy s':>8} {'ratio':>6} "
        f"{'RSS before':>10} {'peak RSS':>9}  drifted"
    )
    for rows, cap, text in CASES:
        out = subprocess.run(
            [sys.executable, __file__, "--worker", str(rows), str(cap), "1" if text else "0"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{r['rows']:>10} {r['text']!s:>5} {r['text_cap'] or '-'!s:>6} {r['seconds']:>8.2f} "
            f"{r['scipy_baseline_seconds']:>8.3f} {r['ratio_vs_baseline']:>6} {r['rss_before_mb']:>9.0f}M "
            f"{r['peak_rss_mb']:>8.0f}M  {','.join(r['drifted'])}"
        )


if __name__ == "__main__":
    main()
