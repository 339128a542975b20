"""Old drift reports are pruned on real SQLite and PostgreSQL: the newest N runs of each deployment keep their HTML,
older runs keep their numbers, and each machine's files of the pruned ones go after the grace period."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import select

from service.core.deleted_files import DeletedFiles
from service.core.drift import prune_drift_reports
from service.storage.artifacts import ArtifactStore
from service.storage.models import ArtifactChunk, Deployment, MonitorRun


async def test_old_drift_reports_lose_their_html_and_keep_their_numbers(sessions: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "machine"
    store = ArtifactStore(sessions, data_dir, store=True)
    runs: dict[str, list[MonitorRun]] = {"busy": [], "quiet": []}
    async with sessions() as s, s.begin():
        for dep in runs:
            s.add(Deployment(name=dep, base_model="m"))
    for i in range(5):
        for dep, dep_runs in runs.items():
            html = data_dir / "drift" / dep / f"{i}.html"
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(f"<html>{dep} {i}</html>")
            os.utime(html, (1.0, 1.0))  # written long ago
            run = MonitorRun(deployment=dep, kind="drift", data={"share": i / 10}, html_path=str(html))
            async with sessions() as s, s.begin():
                s.add(run)
                await s.flush()
                await store.add(s, f"drift-{run.id}", html)
            dep_runs.append(run)
    busy = runs["busy"]
    # another machine's API process fetched the copy of an old report and of a new one
    for run in (busy[0], busy[4]):
        fetched = await store.local(f"drift-{run.id}", str(tmp_path / "elsewhere" / Path(run.html_path).name))
        assert Path(fetched).read_text() == Path(run.html_path).read_text()
    # a report just written, whose run is not stored yet
    fresh = data_dir / "drift" / "busy" / "fresh.html"
    fresh.write_text("<html>fresh</html>")

    assert sorted(await prune_drift_reports(sessions, "busy", keep=2)) == [r.id for r in busy[:3]]
    assert await prune_drift_reports(sessions, "busy", keep=2) == []
    async with sessions() as s:
        rows = {r.id: r for r in (await s.execute(select(MonitorRun))).scalars()}
        stored = set((await s.execute(select(ArtifactChunk.artifact_id))).scalars())
    assert [rows[r.id].html_path is None for r in busy] == [True, True, True, False, False]
    assert [rows[r.id].data["share"] for r in busy] == [0.0, 0.1, 0.2, 0.3, 0.4]  # the numbers stay
    assert all(rows[r.id].html_path == r.html_path for r in runs["quiet"])  # another deployment: untouched
    assert stored == {f"drift-{r.id}" for r in busy[3:] + runs["quiet"]}

    files = DeletedFiles(sessions, store, data_dir, grace_seconds=3600)
    removed = set(await files.sweep())
    assert removed == {Path(r.html_path).resolve() for r in busy[:3]} | {store.cached(f"drift-{busy[0].id}").resolve()}
    assert fresh.exists() and store.cached(f"drift-{busy[4].id}").exists()
    assert all(Path(r.html_path).exists() for r in busy[3:] + runs["quiet"])
    files.grace_seconds = 0  # an orphan older than the grace period goes too
    assert await files.sweep() == [fresh.resolve()]
