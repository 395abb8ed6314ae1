"""Hostile files through every entry point that reads weights or configs: a clear error, nothing executed."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from faultkit import run_cli
from safetensors.torch import save_file

import davit
from davit.weights import WeightsError


class _Payload:
    """Unpickling this calls os.system: a real attack would do anything; ours touches a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """(paths of hostile weight files, marker path). Both pickle formats: raw protocol-2 and torch's zip."""
    marker = tmp_path / "PWNED"
    raw, zipped = tmp_path / "evil_raw.pth", tmp_path / "evil_zip.pth"
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": {"head.fc.weight": _Payload(str(marker))}}, f, protocol=2)
    torch.save({"state_dict": _Payload(str(marker))}, zipped)
    # the payload is real: an unsafe load would run it (checked once, then the marker is removed)
    pickle.loads(raw.read_bytes())
    assert marker.exists()
    marker.unlink()
    return [raw, zipped], marker


def _sidecar(p) -> None:
    """A matching .sha256 (an attacker can write one too): the checksum alone must not be what protects."""
    d = hashlib.sha256(p.read_bytes()).hexdigest()
    p.with_name(p.name + ".sha256").write_text(f"{d}  {p.name}\n")


def test_create_model_pretrained_path(evil):
    files, marker = evil
    for f in files:
        with pytest.raises(WeightsError, match="refusing to load"):
            davit.create_model("davit_atto", pretrained=str(f))
    assert not marker.exists()


@pytest.mark.slow
def test_cli_entry_points(evil, tmp_path, tiny_train, capsys):
    files, marker = evil
    for f in files:
        cases = [
            ["convert", str(f), str(tmp_path / "out.safetensors")],
            ["eval", str(f), "--model", "davit_atto", "--num-samples", "4"],
            ["predict", str(tmp_path / "x.png"), "--checkpoint", str(f), "--model", "davit_atto"],
            tiny_train("--initial-checkpoint", str(f)),
        ]
        for argv in cases:
            rc, out = run_cli(argv, capsys)
            assert rc == 2, (argv, out)
            assert "refusing to load" in out and "can run code" in out, (argv, out)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_resume_from_hostile_checkpoint(evil, tmp_path, tiny_train, capsys):
    files, marker = evil
    for f in files:
        _sidecar(f)
        rc, out = run_cli(tiny_train("--resume", str(f)), capsys)
        assert rc == 2, out
        # torch's weights-only unpickler names the global it refused (os.system / posix.system)
        assert "cannot read checkpoint" in out and "system" in out, out
    # and dropped into a run folder as the newest checkpoint, --resume auto refuses it the same way
    ck = tmp_path / "runs" / "r" / "checkpoints"
    ck.mkdir(parents=True)
    bad = ck / "ckpt-000000099.pt"
    bad.write_bytes(files[1].read_bytes())
    _sidecar(bad)
    rc, out = run_cli(tiny_train("--resume", "auto", "--experiment", "r"), capsys)
    assert rc == 2 and "cannot read checkpoint" in out, out
    assert not marker.exists()


def test_random_bytes_everywhere(tmp_path, tiny_train, capsys):
    rng = np.random.default_rng(0)
    data = b"\x13" + rng.integers(0, 256, 4095, np.uint8).tobytes()  # not a pickle (0x80) or zip (PK) start
    junk = tmp_path / "junk.pth"
    junk.write_bytes(data)
    st = tmp_path / "junk.safetensors"
    st.write_bytes(data)
    for f in (junk, st):
        with pytest.raises(WeightsError, match="corrupted or truncated|not a valid pickle"):
            davit.create_model("davit_atto", pretrained=str(f))
        for argv in (
            ["convert", str(f), str(tmp_path / "o.safetensors")],
            tiny_train("--initial-checkpoint", str(f)),
        ):
            rc, out = run_cli(argv, capsys)
            assert rc == 2 and ("corrupted or truncated" in out or "not a valid pickle" in out), out
    _sidecar(junk)
    rc, out = run_cli(tiny_train("--resume", str(junk)), capsys)
    assert rc == 2 and "cannot read checkpoint" in out, out


def test_safetensors_wrong_shapes_and_dtypes(tmp_path, capsys):
    sd = davit.create_model("davit_atto").state_dict()
    shape = dict(sd)
    shape["stages.1.blocks.0.0.attn.qkv.weight"] = torch.zeros(7, 3)
    dtype = {k: (v.to(torch.int32) if k == "head.norm.weight" else v) for k, v in sd.items()}
    for name, bad, expect in (("shape", shape, "shape"), ("dtype", dtype, "dtype")):
        p = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in bad.items()}, str(p))
        with pytest.raises((WeightsError, ValueError, RuntimeError), match=expect):
            davit.create_model("davit_atto", pretrained=str(p))


def test_config_yaml_unknown_keys_and_wrong_types(tmp_path, tiny_train, capsys):
    pwned = tmp_path / "PWNED"
    cases = {  # file -> (text, words the error must hold)
        "unknown.yaml": ("bach_size: 8\n", ["unknown.yaml", "bach_size", "Did you mean 'batch_size'"]),
        "type.yaml": ("batch_size: eight\n", ["batch_size", "wrong type", "expected int"]),
        "list.yaml": ("- 1\n- 2\n", ["list.yaml", "expected a mapping"]),
        "python.yaml": (
            f"lr: !!python/object/apply:os.system ['touch {pwned}']\n",
            ["python.yaml", "not valid YAML"],
        ),
        "garbage.yaml": ("{{{: [\n", ["garbage.yaml", "not valid YAML"]),
    }
    for name, (text, words) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        rc, out = run_cli(tiny_train("--config", str(p)), capsys)
        assert rc == 2, (name, out)
        for w in words:
            assert w in out, (name, w, out)
    assert not pwned.exists()
