"""Storage faults: disk full while saving, truncated and bit-flipped checkpoints, a kill while the final
weights are written. Each ends in a run whose final weights equal an uninterrupted run's."""

from __future__ import annotations

import errno
import shutil
import warnings

import pytest
import torch
from faultkit import FMNIST_ARGS, TINY_ARGS
from safetensors.torch import load_file

import davit.train.checkpoint as ckmod
from davit.cli import main
from davit.train.checkpoint import find_latest_valid, verify_checkpoint

EXTRA = ["--epochs", "2", "--checkpoint-every-steps", "1", "--keep-last", "2"]  # 4 steps, a checkpoint each


def _train(out, exp, *extra) -> int:
    return main(
        ["train", *TINY_ARGS, *FMNIST_ARGS, *EXTRA, "--output", str(out), "--experiment", exp, *extra]
    )


def _same_weights(a, b) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    assert _train(out, "ref") == 0
    return out / "ref"


class _FullDisk:
    """Stands in for ``open`` in checkpoint.py: the ``fail_at``-th checkpoint data file gets half its bytes
    written, then ENOSPC, as a full disk would."""

    def __init__(self, fail_at: int) -> None:
        self.n, self.fail_at = 0, fail_at

    def __call__(self, path, mode="r", *a, **kw):
        f = open(path, mode, *a, **kw)
        name = str(path).rsplit("/", 1)[-1]
        if "w" in mode and name.startswith(".ckpt-") and ".sha256" not in name:
            self.n += 1
            if self.n == self.fail_at:
                real_write = f.write

                def write(data):
                    real_write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, "No space left on device")

                f.write = write
        return f


@pytest.mark.slow
def test_disk_full_then_bitflip_then_resume(tmp_path, reference, monkeypatch, capsys):
    monkeypatch.setattr(ckmod, "open", _FullDisk(fail_at=3), raising=False)
    rc = _train(tmp_path, "run")
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 2
    assert (
        "No space left on device" in err and "previous checkpoint is intact" in err and "--resume auto" in err
    )
    ck = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in ck.iterdir())
    # the third step checkpoint (step 3; step 2, the epoch's end, is written once, after its evaluation, with
    # best.pt) hit the full disk: the two before it and best.pt are whole, and no partial file is left behind
    assert names == [
        "best.pt",
        "best.pt.sha256",
        "ckpt-000000001.pt",
        "ckpt-000000001.pt.sha256",
        "ckpt-000000002.pt",
        "ckpt-000000002.pt.sha256",
    ], names  # fmt: skip
    for p in ck.glob("*.pt"):
        verify_checkpoint(p)
    # now the newest checkpoint rots: one bit flipped; resume must warn and take step 1
    p2 = ck / "ckpt-000000002.pt"
    raw = bytearray(p2.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    p2.write_bytes(bytes(raw))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert _train(tmp_path, "run", "--resume", "auto") == 0
    assert any("skipping invalid checkpoint" in str(x.message) and "corrupted" in str(x.message) for x in w)
    assert "resumed from" in capsys.readouterr().out
    _same_weights(tmp_path / "run" / "model.safetensors", reference / "model.safetensors")


def test_truncated_and_flipped_are_skipped(tmp_path):
    m = ckmod.CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        m.save({"w": torch.full((1000,), float(step))}, step)
    p3, p2 = tmp_path / "ckpt-000000003.pt", tmp_path / "ckpt-000000002.pt"
    p3.write_bytes(p3.read_bytes()[:-100])  # truncated copy
    raw = bytearray(p2.read_bytes())
    raw[200] ^= 1  # one bit
    p2.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="skipping invalid checkpoint") as rec:
        assert find_latest_valid(tmp_path).name == "ckpt-000000001.pt"
    assert len(rec) == 2
    # a sidecar missing (crash between the two renames) and an empty sidecar are skipped the same way
    (tmp_path / "ckpt-000000001.pt.sha256").write_text("")
    with pytest.warns(UserWarning):
        assert find_latest_valid(tmp_path) is None


def test_killed_while_writing_final_weights(tmp_path, reference):
    # the process died after its last checkpoint, before model.safetensors and report.md were complete
    run = tmp_path / "ref"
    shutil.copytree(reference, run)
    (run / "model.safetensors").write_bytes((reference / "model.safetensors").read_bytes()[:1000])
    (run / "report.md").unlink()
    assert _train(tmp_path, "ref", "--resume", "auto") == 0
    _same_weights(run / "model.safetensors", reference / "model.safetensors")
    assert "top-1" in (run / "report.md").read_text()
