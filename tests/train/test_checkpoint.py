import random
from pathlib import Path

import numpy as np
import pytest
import torch

from davit.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_write,
    find_latest_valid,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)


def test_save_verify_load(tmp_path):
    st = {"model": {"w": torch.arange(6.0)}, "step": 3}
    digest = save_checkpoint(st, tmp_path / "ckpt-000000003.pt")
    side = (tmp_path / "ckpt-000000003.pt.sha256").read_text()
    assert side == f"{digest}  ckpt-000000003.pt\n"  # sha256sum -c format
    verify_checkpoint(tmp_path / "ckpt-000000003.pt")
    back = load_checkpoint(tmp_path / "ckpt-000000003.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["w"], st["model"]["w"])
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_corruption_detected_and_skipped_by_resume(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(
            {"step": step, "w": torch.full((100,), float(step))}, tmp_path / f"ckpt-{step:09d}.pt"
        )
    newest = tmp_path / "ckpt-000000003.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        verify_checkpoint(newest)
    (tmp_path / "ckpt-000000002.pt.sha256").unlink()  # as after a crash between data and checksum
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"):
        assert find_latest_valid(tmp_path).name == "ckpt-000000001.pt"


def test_atomic_write_keeps_old_content_when_write_fails(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write(p, b"old")

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    # the OSError is re-raised as a CheckpointError that says the previous file is intact and what to do
    with pytest.raises(CheckpointError, match="disk full.*previous checkpoint is intact"):
        atomic_write(p, b"new content")
    assert p.read_bytes() == b"old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left behind


def test_resave_interrupted_between_renames_is_uncommitted_not_damaged(tmp_path, monkeypatch):
    """A path saved again (best.pt, a step saved twice) and killed after its data rename: the file must read
    as never committed (no checksum, skipped), not as new data under the old checksum (a damaged file)."""
    import davit.train.checkpoint as ck

    p = tmp_path / "ckpt-000000004.pt"
    save_checkpoint({"step": 4, "epoch": 0}, p)
    real, calls = ck.atomic_write, []

    def dies_after_data(path, data):
        calls.append(Path(path).name)
        if Path(path).name.endswith(".sha256"):
            raise KeyboardInterrupt("killed between the two renames")
        real(path, data)

    monkeypatch.setattr(ck, "atomic_write", dies_after_data)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 4, "epoch": 1}, p)
    assert calls == ["ckpt-000000004.pt", "ckpt-000000004.pt.sha256"]
    with pytest.raises(CheckpointError, match="no checksum file"):
        verify_checkpoint(p)
    monkeypatch.setattr(ck, "atomic_write", real)
    save_checkpoint({"step": 4, "epoch": 1}, p)  # the next save commits it again
    assert load_checkpoint(p)["epoch"] == 1


def test_manager_keeps_last_k_and_best(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        m.save({"step": step}, step, is_best=step == 2)
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == [
        "best.pt",
        "best.pt.sha256",
        "ckpt-000000003.pt",
        "ckpt-000000003.pt.sha256",
        "ckpt-000000004.pt",
        "ckpt-000000004.pt.sha256",
    ]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2 and m.latest().name == "ckpt-000000004.pt"


def test_set_aside_moves_an_earlier_runs_checkpoints_so_a_new_run_keeps_its_own(tmp_path):
    """A run starting over in a folder an earlier run used: left in place, the earlier run's higher steps
    would outlive the new run's checkpoints in the pruning and a resume would continue the earlier run."""
    old = CheckpointManager(tmp_path, keep_last=2)
    for step in (7, 8):
        old.save({"step": step, "run": "old"}, step, is_best=step == 8)
    (tmp_path / "ckpt-000000009.pt").write_bytes(b"uncommitted")  # a crash mid-write: no checksum
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    new = CheckpointManager(tmp_path, keep_last=2)
    moved = new.set_aside()
    assert moved is not None and moved.parent == tmp_path and moved.name.startswith("replaced-")
    assert sorted(f.name for f in moved.iterdir()) == [
        "best.pt", "best.pt.sha256", "ckpt-000000007.pt", "ckpt-000000007.pt.sha256", "ckpt-000000008.pt",
        "ckpt-000000008.pt.sha256", "ckpt-000000009.pt"]  # fmt: skip
    assert load_checkpoint(moved / "ckpt-000000008.pt")["run"] == "old"  # moved intact, nothing lost
    assert (tmp_path / "notes.txt").is_file() and new.latest() is None
    for step in (1, 2, 3):
        new.save({"step": step, "run": "new"}, step)
    assert load_checkpoint(new.latest()) == {"step": 3, "run": "new"}
    assert new.set_aside() != moved and CheckpointManager(tmp_path / "absent").set_aside() is None


def test_rng_state_round_trip_through_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "r.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
