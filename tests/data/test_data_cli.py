"""`davit data check` and `davit data shards` on a folder with bad files."""

import json
import os

from davit.cli import main


def test_check_reports_bad_files(odd_folder, capsys):
    rc = main(["data", "check", "--data-dir", odd_folder, "-j", "0", "--max-pixels", "10000", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1  # bad files found
    assert report["train"]["files"] == 17 and report["train"]["readable"] == 13
    assert sorted(os.path.basename(p) for p, _ in report["val"]["bad"]) == sorted(
        ["bomb.png", "text.jpg", "truncated.jpg", "zero_bytes.jpg"]
    )
    assert report["classes_match"] is True


def test_shards(odd_folder, tmp_path, capsys):
    out = str(tmp_path / "shards")
    assert main(["data", "shards", "--data-dir", odd_folder, "--out", out, "--shard-size", "5"]) == 0
    text = capsys.readouterr().out
    assert "wrote 14 samples of 2 classes in 3 shards" in text and "3 unreadable files left out" in text
    assert sorted(os.listdir(out)) == [
        "index.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
