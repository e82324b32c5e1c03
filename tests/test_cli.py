"""The command line: help for every verb, dry-run table, config errors, sweeps."""

import os
import subprocess
import sys

import pytest

from morphjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "classifier.py") + ":tiny"


@pytest.mark.parametrize("verb", ["train", "sweep"])
def test_help_for_every_verb(verb):
    out = subprocess.run([sys.executable, "-m", "morphjax.cli", verb, "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0 and "--config" in out.stdout and "--workdir" in out.stdout


def test_dry_run_prints_modules_total_and_memory(tmp_path, capsys):
    assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--dry-run",
                     "--set", "mesh.fsdp=8", "--set", "mesh.data=1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: int(line.split()[1].replace(",", ""))
            for line in out.splitlines() if line.startswith("classifier.")}
    assert {"classifier.stem", "classifier.stages.0", "classifier.head"} <= set(rows)
    total = int(next(l for l in out.splitlines() if l.startswith("total")).split()[1].replace(",", ""))
    assert total == sum(rows.values())
    # stem: 3x3x3x16 conv + BN scale/bias; stage: 3x3x16x32 + 2x32; head: 32x4 + 4.
    assert total == (27 * 16 + 32) + (9 * 16 * 32 + 64) + (32 * 4 + 4)
    assert "'fsdp': 8" in out and "optimizers" in out and "MiB" in out
    assert not os.listdir(tmp_path)  # Nothing trained, nothing written.


def test_config_error_exits_2_naming_the_key(tmp_path, capsys):
    assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path),
                     "--set", "train.totl_steps=5"]) == 2
    err = capsys.readouterr().err
    assert "'train.totl_steps'" in err and "'train.total_steps'" in err


def test_sweep_writes_one_run_directory_per_point(tmp_path, capsys):
    args = ["sweep", "--config", TINY, "--workdir", str(tmp_path), "--set", "train.total_steps=2",
            "--set", "train.eval_every=0"]
    assert cli.main([*args, "--list"]) == 0
    assert not os.listdir(tmp_path)
    assert cli.main(args) == 0
    runs = sorted(os.listdir(tmp_path))
    assert runs == ["learning_rate=0.01", "learning_rate=0.05"]
    for run in runs:
        assert os.path.isdir(tmp_path / run / "checkpoints" / "2")
        with open(tmp_path / run / "config.json") as f:
            assert f"\"learning_rate\": {run.split('=')[1]}" in f.read()
