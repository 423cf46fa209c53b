"""Generation links (an instant restore): a new CBT generation that starts
from a backup makes the next backup an incremental against it, planned from
the CBT numbers above the link's, accepted by the writer, and restoring to
the backup plus the changes; a link never makes a wrong parent."""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from blksnap.backup.repo import Repository
from blksnap.backup.session import plan_device
from blksnap.engine.cbt import CbtInfo
from blksnap.errors import BlksnapError
from tests.backup.test_repo import (
    BS,
    CS,
    SIZE,
    change,
    cheap_argon2,  # noqa: F401 - autouse fixture
    chunk,
    full,
    incr,
    make_device,
    record,
    restored,
)

NEW_GEN = str(uuid.UUID(int=0x1234))


def cbt(changes: int, gen: str = NEW_GEN) -> CbtInfo:
    return CbtInfo(BS, SIZE, (SIZE + BS - 1) // BS, gen, changes)


def cbt_map(blocks: list[int], number: int) -> bytes:
    m = np.zeros((SIZE + BS - 1) // BS, dtype=np.uint8)
    m[blocks] = number
    return m.tobytes()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(tmp_path / "repo", chunk_size=CS)


def test_a_linked_generation_backs_up_incrementally_against_the_backup(
    repo: Repository, tmp_path: Path
) -> None:
    v0 = make_device(1)
    b0 = full(repo, v0)
    v1 = change(v0, [5], 2)
    b1 = incr(repo, v1, [5], b0.id)  # newer than the one restored
    # The device restored as of b0 gets a new generation, linked at number 0.
    repo.link_generation(NEW_GEN, b0.id, "disk0", 0)
    blocks = [(7 * CS) // BS, (7 * CS) // BS + 1]  # written since: chunk 7
    plan = plan_device(repo, "disk0", "incremental", cbt(1), cbt_map(blocks, 1))
    assert plan.kind == "incremental" and plan.parent == b0.id, plan.reason
    assert plan.chunks.tolist() == [7]
    assert "starts from" in plan.reason
    v2 = change(v0, [7], 3)
    with repo.begin("incremental") as w:
        w.add_device(record(kind="incremental", parent=b0.id, gen=NEW_GEN, changes=1))
        w.put("disk0", 7, chunk(v2, 7))
        b2 = w.commit()
    assert restored(repo, b2.id, tmp_path) == v2
    assert restored(repo, b1.id, tmp_path) == v1  # (the newer one untouched)
    # Once the generation has a backup of its own, links play no part.
    plan = plan_device(repo, "disk0", "incremental", cbt(2), cbt_map([0], 2))
    assert plan.parent == b2.id and "starts from" not in plan.reason


def test_without_a_link_another_generation_is_full(repo: Repository) -> None:
    b0 = full(repo, make_device(1))
    plan = plan_device(repo, "disk0", "incremental", cbt(1), cbt_map([0], 1))
    assert plan.kind == "full" and "generation changed" in plan.reason
    with repo.begin("incremental") as w, pytest.raises(BlksnapError) as exc:
        w.add_device(record(kind="incremental", parent=b0.id, gen=NEW_GEN))
    assert exc.value.errno == errno.EINVAL and "another CBT generation" in exc.value.message


def test_a_link_is_not_used_when_it_cannot_be_trusted(repo: Repository, tmp_path: Path) -> None:
    b0 = full(repo, make_device(1))
    repo.link_generation(NEW_GEN, b0.id, "disk0", 0)
    path = Path(repo.path, "links", NEW_GEN + ".json")
    doc = json.loads(path.read_text())
    # Altered (its MAC fails): not used.
    path.write_text(json.dumps({**doc, "changes_number": 0, "backup": "20990101T000000Z"}))
    assert repo.generation_link(NEW_GEN, "disk0") is None
    plan = plan_device(repo, "disk0", "incremental", cbt(1), cbt_map([0], 1))
    assert plan.kind == "full"
    # Another device's link: not used for this one.
    path.unlink()
    repo.link_generation(NEW_GEN, b0.id, "disk0", 0)
    assert plan_device(repo, "other", "incremental", cbt(1), cbt_map([0], 1)).kind == "full"
    # A differential needs a full parent: a link to an incremental does not do.
    b1 = incr(repo, change(make_device(1), [2], 5), [2], b0.id)
    gen2 = str(uuid.UUID(int=0x5678))
    repo.link_generation(gen2, b1.id, "disk0", 0)
    plan = plan_device(repo, "disk0", "differential", cbt(1, gen2), cbt_map([0], 1))
    assert plan.kind == "full"
    plan = plan_device(repo, "disk0", "incremental", cbt(1, gen2), cbt_map([0], 1))
    assert plan.parent == b1.id
    # The linked backup pruned: the link leads nowhere, the backup is full.
    repo.prune(1)  # keeps b1 only
    plan = plan_device(repo, "disk0", "incremental", cbt(1), cbt_map([0], 1))
    assert plan.kind == "full"


def test_a_link_needs_the_backup_and_the_device(repo: Repository) -> None:
    b0 = full(repo, make_device(1))
    with pytest.raises(BlksnapError) as exc:
        repo.link_generation(NEW_GEN, b0.id, "nope", 0)
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(BlksnapError) as exc:
        repo.link_generation("not-a-uuid", b0.id, "disk0", 0)
    assert exc.value.errno == errno.EINVAL
