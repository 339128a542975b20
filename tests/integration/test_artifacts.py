"""The artifact store on real SQLite and PostgreSQL: the files a record points at, stored in the record's
transaction, fetched whole by a process whose machine does not have them (`service.storage.artifacts`)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from service.storage.artifacts import ArtifactStore
from service.storage.models import ArtifactChunk


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _adapter_dir(root: Path) -> Path:
    d = root / "adapters" / "dep" / "3"
    (d / "nested").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(os.urandom(10_000))  # ten chunks of 1,000 bytes
    (d / "nested" / "empty.txt").write_bytes(b"")
    return d


async def _chunks(sessions: Any, artifact_id: str) -> int:
    async with sessions() as s:
        return (await s.execute(select(func.count()).where(ArtifactChunk.artifact_id == artifact_id))).scalar_one()


async def test_a_directory_stored_with_its_record_is_fetched_whole_where_its_path_does_not_exist(
        sessions: Any, tmp_path: Path) -> None:
    made_here = _adapter_dir(tmp_path / "machine-a")
    expected = _tree(made_here)
    writer = ArtifactStore(sessions, tmp_path / "machine-a", store=True, chunk_bytes=1000)
    async with sessions() as s, s.begin():
        await writer.add(s, "adp-1", made_here)
    assert await _chunks(sessions, "adp-1") == 12  # 1 + 10 + 1 (the empty file)

    reader = ArtifactStore(sessions, tmp_path / "machine-b", store=False)
    assert await reader.local("adp-1", str(made_here)) == str(made_here)  # where it exists, as recorded
    shutil.rmtree(tmp_path / "machine-a")
    fetched = Path(await reader.local("adp-1", str(made_here)))
    assert fetched == tmp_path / "machine-b" / "artifacts" / "adp-1" / "3"
    assert _tree(fetched) == expected
    assert [p.name for p in (tmp_path / "machine-b" / "artifacts").iterdir()] == ["adp-1"]  # no temporary left

    async with sessions() as s, s.begin():  # fetched once: the copy serves even without the rows
        await s.execute(ArtifactChunk.__table__.delete())
    assert await reader.local("adp-1", str(made_here)) == str(fetched)


async def test_a_lone_file_keeps_its_name(sessions: Any, tmp_path: Path) -> None:
    report = tmp_path / "a" / "evaluations" / "eval-1.html"
    report.parent.mkdir(parents=True)
    report.write_text("<html>report</html>")
    async with sessions() as s, s.begin():
        await ArtifactStore(sessions, tmp_path / "a", store=True).add(s, "eval-1", report)
    report.unlink()
    fetched = await ArtifactStore(sessions, tmp_path / "b", store=False).local("eval-1", str(report))
    assert fetched == str(tmp_path / "b" / "artifacts" / "eval-1" / "eval-1.html")
    assert Path(fetched).read_text() == "<html>report</html>"


async def test_nothing_is_stored_when_off_or_when_the_record_is_rolled_back(sessions: Any, tmp_path: Path) -> None:
    made_here = _adapter_dir(tmp_path / "a")
    async with sessions() as s, s.begin():
        await ArtifactStore(sessions, tmp_path / "a", store=False).add(s, "adp-off", made_here)
    assert await _chunks(sessions, "adp-off") == 0

    store = ArtifactStore(sessions, tmp_path / "a", store=True)
    try:
        async with sessions() as s, s.begin():
            await store.add(s, "adp-rolled-back", made_here)
            raise RuntimeError("the record's transaction fails")
    except RuntimeError:
        pass
    assert await _chunks(sessions, "adp-rolled-back") == 0
    missing = str(tmp_path / "gone")
    assert await store.local("adp-rolled-back", missing) == missing  # its reader fails as it would have


async def test_storing_an_id_twice_keeps_the_first_and_two_fetches_at_once_agree(sessions: Any, tmp_path: Path) -> None:
    first = _adapter_dir(tmp_path / "a")
    expected = _tree(first)
    store = ArtifactStore(sessions, tmp_path / "a", store=True, chunk_bytes=1000)
    async with sessions() as s, s.begin():
        await store.add(s, "snap-1", first)
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.jsonl").write_text("{}\n")
    async with sessions() as s, s.begin():  # a content-addressed snapshot written again: no duplicate key
        await store.add(s, "snap-1", other)
    assert await _chunks(sessions, "snap-1") == 12

    shutil.rmtree(tmp_path / "a")
    shared = tmp_path / "b"  # two processes of one machine, one data directory
    paths = await asyncio.gather(*(ArtifactStore(sessions, shared, store=False).local("snap-1", str(first))
                                   for _ in range(3)))
    assert len(set(paths)) == 1 and _tree(Path(paths[0])) == expected
    assert [p.name for p in (shared / "artifacts").iterdir()] == ["snap-1"]
