"""Two gloo processes under torchrun train like one process with the same global batch."""

from pathlib import Path

import pytest

from davit.train.logging import read_metrics

ARGS = [
    "--model",
    "davit_atto",
    "--img-size",
    "16",
    "--in-chans",
    "1",
    "--num-classes",
    "10",
    "--simple-aug",
    # augmentation is seeded per (rank, batch), so a 2-process run augments differently: switch it off here
    "--crop-padding",
    "0",
    "--hflip",
    "0",
    "--model-kwargs",
    "{depths: [1, 1, 1, 1], embed_dims: [16, 16, 16, 16], num_heads: [1, 1, 1, 1], window_size: 4}",
    "--train-samples",
    "64",
    "--val-samples",
    "32",
    "-j",
    "0",
    "--epochs",
    "1",
    "--warmup-epochs",
    "0.5",
    "--cooldown-epochs",
    "0",
    "--drop-path",
    "0",
    "--smoothing",
    "0",
    "--log-interval",
    "1",
    "--progress",
    "plain",
    "--no-tensorboard",
    "--seed",
    "3",
    "--device",
    "cpu",
]


def _losses(d):
    return [r["loss"] for r in read_metrics(Path(d) / "metrics.jsonl") if r["kind"] == "train"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, davit_cli):
    """The single-process reference run (batch 16), shared by the DDP and FSDP comparisons."""
    tmp = tmp_path_factory.mktemp("one")
    davit_cli(
        [
            "train",
            *ARGS,
            "-b",
            "16",
            "--output",
            str(tmp),
            "--experiment",
            "one",
        ],
        tmp,
    )
    return _losses(tmp / "one"), [r for r in read_metrics(tmp / "one/metrics.jsonl") if r["kind"] == "epoch"][
        0
    ]


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path, davit_cli, one_process):
    out = str(tmp_path / "runs")
    r = davit_cli(
        [
            "train",
            *ARGS,
            "-b",
            "8",
            "--output",
            out,
            "--experiment",
            "two",
        ],
        tmp_path,
        nproc=2,
    )
    assert "world size 2" in r.stdout
    assert r.stdout.count("final top-1") == 1  # printed by rank 0 only
    (one, ev1), two = one_process, _losses(tmp_path / "runs/two")
    assert len(one) == len(two) == 4
    # same samples per global step (strided shards of one permutation), gradients averaged by DDP:
    # only float summation order differs
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    ev2 = [r for r in read_metrics(tmp_path / "runs/two/metrics.jsonl") if r["kind"] == "epoch"][0]
    assert ev2["top1"] == pytest.approx(ev1["top1"], abs=3.2)  # at most one of 32 images flips
    # rank 0 alone wrote the run folder: one line per step, no stray temporary files
    assert len([r for r in read_metrics(tmp_path / "runs/two/metrics.jsonl") if r["kind"] == "train"]) == 4
    assert not list((tmp_path / "runs/two").rglob("*.tmp*"))


@pytest.mark.slow
def test_fsdp2_two_process_gloo_matches_one_process(tmp_path, davit_cli, one_process):
    """--fsdp (FSDP2 fully_shard per dual block) with --grad-checkpointing trains like a single process."""
    out = str(tmp_path / "runs")
    r = davit_cli(
        [
            "train",
            *ARGS,
            "-b",
            "8",
            "--fsdp",
            "--grad-checkpointing",
            # an uneven validation split: rank 0 gets 17 images (3 batches of 8), rank 1 16 (2 batches).
            # Every FSDP forward all-gathers parameters, so a rank stopping one batch early hung the other
            "--val-samples",
            "33",
            "--output",
            out,
            "--experiment",
            "fsdp",
        ],
        tmp_path,
        nproc=2,
    )
    assert "world size 2" in r.stdout
    one, two = one_process[0], _losses(tmp_path / "runs/fsdp")
    assert len(two) == 4 and two == pytest.approx(one, rel=1e-4, abs=1e-5)
    # all 33 validation images scored once (the rank out of batches ran dummies that scored nothing)
    ev = [r for r in read_metrics(tmp_path / "runs/fsdp/metrics.jsonl") if r["kind"] == "epoch"][0]
    assert ev["val_count"] == 33
    # the final weights are the full, unsharded tensors and load into a plain model
    from davit.train.setup import model_from_metadata

    net, meta = model_from_metadata(str(tmp_path / "runs/fsdp/model.safetensors"))
    assert meta["model"] == "davit_atto" and net.num_classes == 10


@pytest.mark.slow
def test_two_process_time_budget_follows_rank0_plan_and_deadline(tmp_path, davit_cli):
    """--time-budget under torchrun: one plan and one deadline for all ranks (rank 0's, broadcast); a budget
    already spent ends training after the first step on every rank together, which still evaluate and save."""
    out = tmp_path / "runs"
    args = list(ARGS)
    args[args.index("--epochs") + 1] = "5"
    r = davit_cli(
        [
            "train",
            *args,
            "-b",
            "8",
            "--time-budget",
            "1",
            "--output",
            str(out),
            "--experiment",
            "budget",
        ],
        tmp_path,
        nproc=2,
    )
    assert "world size 2" in r.stdout and "time budget reached: training ended at step 1" in r.stdout
    assert len(_losses(out / "budget")) == 1 and (out / "budget/model.safetensors").is_file()


def test_gpu_process_group_also_reduces_cpu_tensors(monkeypatch):
    """On GPUs the loops all-reduce small CPU tensors (loss, stop and deadline flags, metric counts); NCCL
    alone rejects those, so the process group pairs NCCL for CUDA tensors with gloo for CPU ones."""
    import torch

    from davit.train import distributed as d

    seen = {}
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(d, "pick_device", lambda device, local: torch.device("cuda", local))
    monkeypatch.setattr(d.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(d.dist, "init_process_group", lambda **kw: seen.update(kw))
    info = d.init_distributed("cuda")
    assert info.device == torch.device("cuda", 0) and info.world_size == 2
    assert sorted(seen["backend"].split(",")) == ["cpu:gloo", "cuda:nccl"]
    seen.clear()
    monkeypatch.setattr(d, "pick_device", lambda device, local: torch.device("cpu"))
    d.init_distributed("cpu")
    assert seen["backend"] == "gloo"


def _run_with_timeout(args: list[str], cwd, nproc: int, timeout: float):
    """`torchrun -m davit ARGS` that fails the test instead of blocking when it hangs: torchrun is stopped,
    and it stops its workers (they run in sessions of their own, out of reach of a process-group kill)."""
    import os
    import subprocess
    import sys

    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # TMPDIR: torchrun leaves a log folder per run in the temp directory
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(cwd)}
    p = subprocess.Popen(
        [*head, "-m", "davit", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()  # torchrun sends its workers SIGTERM, then SIGKILL 30 s later
        try:
            out, _ = p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            p.kill()
            out = ""
        pytest.fail(f"davit train under torchrun hung (killed after {timeout:.0f}s):\n{out[-3000:]}")
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_two_process_batch_all_unreadable_on_one_rank(tmp_path):
    """With -b 1 the batch holding the broken image is empty on one rank only: every rank must leave it out
    (a rank running one step fewer hung the others in the all-reduce), and the epoch line and metrics count
    the skipped files of both ranks."""
    from davit.data import ImageFolder, make_image_folder
    from davit.data.loader import EpochSampler

    root = make_image_folder(str(tmp_path / "imgs"), classes=("a", "b"), per_class=4, size=(16, 16))
    (tmp_path / "imgs/train/a/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    epochs, seed = 2, 3
    # where the broken image falls: in each epoch, on which ranks and how often (the padded shards)
    ds = ImageFolder(root, "train")
    bad_i = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.png"))
    per_epoch, steps = [], []  # times met on each rank; steps run (batches where no rank met it)
    for e in range(epochs):
        shards = []
        for r in range(2):
            s = EpochSampler(len(ds), True, seed, r, 2, pad=True, batch_size=1)
            s.set_epoch(e)
            shards.append(s.indices())
        per_epoch.append([sh.count(bad_i) for sh in shards])
        steps.append(sum(bad_i not in batch for batch in zip(*shards)))
    assert any(min(c) == 0 < max(c) for c in per_epoch), per_epoch  # the case that hung: one rank only
    args = list(ARGS)
    for flag, value in (("--epochs", epochs), ("--seed", seed), ("--in-chans", 3), ("--num-classes", 2)):
        args[args.index(flag) + 1] = str(value)
    i = args.index("--train-samples")
    del args[i : i + 4]  # the whole folder
    run = ["--dataset", "folder", "--data-dir", root, "-b", "1", "--output", str(tmp_path / "runs")]
    out = _run_with_timeout(["train", *args, *run, "--experiment", "bad"], tmp_path, nproc=2, timeout=240)
    recs = read_metrics(tmp_path / "runs/bad/metrics.jsonl")
    ep = [r for r in recs if r["kind"] == "epoch"]
    assert [r["skipped_files"] for r in ep] == [sum(c) for c in per_epoch]
    for e, c in enumerate(per_epoch):
        if sum(c):
            assert f"epoch {e + 1}: {sum(c)} unreadable files skipped: a/broken.png" in out, out[-3000:]
    # each epoch: the shard's batches less the ones left out on either rank
    assert [r["step"] for r in ep] == [steps[0], steps[0] + steps[1]]


def test_slurm_variables_give_rank_world_and_local_rank(monkeypatch):
    """`srun python -m davit train` without torchrun: SLURM_PROCID/NTASKS/LOCALID are the rank, world size
    and local rank; MASTER_ADDR must be given (with the command that finds it), MASTER_PORT defaults."""
    from davit.train import distributed as d

    # a copy of the environment: init_distributed sets RANK, MASTER_PORT... which must not leak to other tests
    env = {k: v for k, v in d.os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
    env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(d.os, "environ", env)
    assert d.env_rank_world() == (0, 1, 0)
    env.update(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1")
    assert d.env_rank_world() == (3, 4, 1)
    monkeypatch.setattr(d.dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*scontrol show hostnames"):
        d.init_distributed("cpu")
    seen = {}
    monkeypatch.setattr(d.dist, "init_process_group", lambda **kw: seen.update(kw))
    env["MASTER_ADDR"] = "node1"
    info = d.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (3, 4, 1) and not info.is_main
    assert (seen["rank"], seen["world_size"], seen["backend"]) == (3, 4, "gloo")
    assert env["MASTER_PORT"] == "29500" and env["RANK"] == "3" and env["LOCAL_RANK"] == "1"
    # torchrun's variables win over SLURM's when both are set (torchrun under an srun allocation)
    env.update(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert d.env_rank_world() == (0, 2, 0)
