"""metrics.jsonl survives a crash mid-write (a torn last line is skipped when read and dropped on resume), and
its records carry the peak GPU memory on CUDA only."""

import json

from davit.train.logging import MetricsLogger, read_metrics


def _write(path, recs, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + torn)


def test_read_metrics_skips_a_torn_line(tmp_path):
    recs = [{"kind": "train", "step": 1, "loss": 2.5}, {"kind": "train", "step": 2, "loss": 2.25}]
    _write(tmp_path / "metrics.jsonl", recs, torn='{"kind": "train", "step": 3, "lo')
    assert read_metrics(tmp_path / "metrics.jsonl") == recs
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_resume_truncates_after_the_checkpoint_and_drops_torn_lines(tmp_path):
    recs = [{"kind": "train", "step": s, "loss": 3.0 - s / 10} for s in (1, 2, 3, 4)]
    _write(tmp_path / "metrics.jsonl", recs, torn='{"kind": "train", "st')
    log = MetricsLogger(tmp_path, tensorboard=False, truncate_after_step=2)  # resuming from step 2
    log.log("train", 3, loss=1.0)
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3]  # every line parses again
    assert json.loads(lines[-1])["loss"] == 1.0


def test_memory_fields_report_the_cuda_peak_only(monkeypatch):
    import torch

    from davit.train.logging import memory_fields

    assert memory_fields(torch.device("cpu")) == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30 + 2**29)
    assert memory_fields(torch.device("cuda", 0)) == {"max_mem_gb": 3.5}
