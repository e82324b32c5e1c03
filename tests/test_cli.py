"""The command line: help for every verb, dry-run table, config errors, sweeps."""

import os
import subprocess
import sys

import pytest

from morphjax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "classifier.py") + ":tiny"


@pytest.mark.parametrize("verb,flags", [
    ("train", ("--config", "--workdir", "--dry-run")), ("sweep", ("--config", "--workdir", "--list")),
    ("build synthetic_screen", ("--preset", "--scale", "--out", "--crop")),
    ("build raw_screen", ("--raw", "--out", "--illumination", "--split"))])
def test_help_for_every_verb(verb, flags):
    out = subprocess.run([sys.executable, "-m", "morphjax.cli", *verb.split(), "--help"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and all(flag in out.stdout for flag in flags)


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


def test_build_synthetic_screen_end_to_end_into_a_grain_batch(tmp_path, capsys):
    """tiny preset: render raw layout -> ArrayRecord -> Grain batch, in seconds."""
    import numpy as np
    import pandas as pd

    from data_builders.raw_screen import open_split, read_tables
    from morphjax import data

    out = tmp_path / "screen"
    assert cli.main(["build", "synthetic_screen", "--preset", "cellpainting_like", "--scale", "tiny",
                     "--out", str(out), "--crop", "64"]) == 0
    printed = capsys.readouterr().out
    assert "cells: found" in printed and "build_report.json" in printed
    index = pd.read_csv(out / "raw" / "index.csv")
    assert {"DNA", "ER", "RNA", "AGP", "Mito", "Metadata_Plate", "Metadata_Perturbation"} <= set(index)
    tables = read_tables(str(out / "dataset"))
    source = open_split(str(out / "dataset"), "train")
    batch = next(iter(data.make_train_dataset(source, batch_size=8, seed=0)))
    assert batch["image"].shape == (8, 64, 64, 5) and batch["image"].dtype == np.uint8
    cells = tables["cells"].set_index("cell_index")
    # Each example's metadata agrees with its row in cells.csv.
    for cell_index, perturbation_id in zip(batch["cell_index"], batch["perturbation_id"]):
        assert cells.loc[int(cell_index), "perturbation_id"] == perturbation_id
        assert cells.loc[int(cell_index), "split"] == "train"
    assert tables["cells"]["is_control"].any() and not tables["cells"]["is_control"].all()


def test_evaluate_embeddings_profiles_and_model_checkpoint(tmp_path, capsys):
    import json

    import numpy as np
    import pandas as pd

    from morphjax import metrics
    from morphjax.data import make_shapes_dataset

    rng = np.random.default_rng(0)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((300, 16)) + 0.5).astype(np.float32)
    np.save(tmp_path / "real.npy", real)
    np.save(tmp_path / "fake.npy", fake)
    assert cli.main(["evaluate", "--real", str(tmp_path / "real.npy"), "--fake",
                     str(tmp_path / "fake.npy"), "--metrics", "fid,prdc", "--out",
                     str(tmp_path / "e1")]) == 0
    values = json.loads((tmp_path / "e1" / "metrics.json").read_text())["metrics"]
    assert values["fid[embeddings]"] == pytest.approx(metrics.fid(real, fake), rel=1e-9)
    assert values["coverage[embeddings]"] == pytest.approx(metrics.prdc(real, fake, k=5)["coverage"])
    assert "fid[embeddings]" in capsys.readouterr().out

    groups = rng.integers(0, 20, 200)
    table = pd.DataFrame(rng.standard_normal((20, 8))[groups] + rng.standard_normal((200, 8)))
    table.columns = [f"f{i}" for i in range(8)]
    table.insert(0, "Metadata_Perturbation", groups)
    table.to_csv(tmp_path / "profiles.csv", index=False)
    assert cli.main(["evaluate", "--profiles", str(tmp_path / "profiles.csv"), "--null-size", "200",
                     "--out", str(tmp_path / "e2")]) == 0
    values = json.loads((tmp_path / "e2" / "metrics.json").read_text())["metrics"]
    ap = metrics.average_precision(table[[f"f{i}" for i in range(8)]].to_numpy(np.float32),
                                   table[["Metadata_Perturbation"]], ["Metadata_Perturbation"], [],
                                   [], ["Metadata_Perturbation"])
    maps = metrics.mean_average_precision(ap, ["Metadata_Perturbation"], 200, 0.05, 0)
    assert values["mean_ap[profiles]"] == pytest.approx(maps["mean_average_precision"].mean())
    assert values["fraction_retrieved[profiles]"] > 0.5  # replicates of distinct centres retrieve
    assert (tmp_path / "e2" / "mean_average_precision.csv").exists()

    run = tmp_path / "run"
    assert cli.main(["train", "--config", TINY, "--workdir", str(run), "--set", "train.total_steps=2",
                     "--set", "train.eval_every=0"]) == 0
    images = make_shapes_dataset(64, image_size=16, seed=3)["image"]
    np.save(tmp_path / "a.npy", images[:32])
    np.save(tmp_path / "b.npy", images[32:])
    assert cli.main(["evaluate", "--real", str(tmp_path / "a.npy"), "--fake", str(tmp_path / "b.npy"),
                     "--features", "model", "--checkpoint", str(run), "--metrics", "fid,kid",
                     "--out", str(tmp_path / "e3")]) == 0
    values = json.loads((tmp_path / "e3" / "metrics.json").read_text())["metrics"]
    assert set(values) == {"fid[model:classifier@2]", "kid_mean[model:classifier@2]",
                           "kid_std[model:classifier@2]"}
    assert np.isfinite(list(values.values())).all()


def test_bench_metrics_prints_side_by_side_table(capsys):
    assert cli.main(["bench", "metrics", "--fid-sizes", "1200", "--map-sizes", "300",
                     "--dim", "64"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("fid", "kid", "density", "mAP"))]
    assert len(rows) == 4 and "speedup" in out and "device:" in out
    fid_ours, fid_ref = (float(v) for v in rows[0].split()[-3::2])
    assert fid_ours == pytest.approx(fid_ref, rel=1e-5)


def test_build_list_and_expression_paired_before_the_build(tmp_path, capsys):
    import numpy as np
    import pandas as pd

    from test_raw_screen import PERTURBATIONS, write_screen

    assert cli.main(["build", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("synthetic_screen", "raw_screen", "bbbc021", "rxrx1", "jump_cpg0000",
                 "deepprofiler_layout", "ops"):
        assert f"\n{name} " in listed
    assert listed.count("needs:") == 7

    raw = str(tmp_path / "raw")
    write_screen(raw, plates=("P1",))
    rng = np.random.default_rng(0)
    ids = list(PERTURBATIONS["perturbation"])
    values = rng.normal(size=(2 * len(ids), 6))  # two replicate signatures per perturbation
    signatures = pd.DataFrame(values, columns=[f"g{i}" for i in range(6)])
    signatures.insert(0, "pert_id", ids + ids)
    signatures.insert(0, "sig_id", [f"s{i}" for i in range(len(signatures))])
    signatures.to_csv(tmp_path / "sig.csv", index=False)
    args = ["build", "raw_screen", "--raw", raw, "--crop", "32", "--illumination-sigma", "8",
            "--expression", str(tmp_path / "sig.csv"), "--landmarks", "all"]
    assert cli.main(args + ["--out", str(tmp_path / "out")]) == 0
    expression = np.load(tmp_path / "out" / "expression.npy")
    expected = signatures.groupby("pert_id", sort=False)[[f"g{i}" for i in range(6)]].mean()
    np.testing.assert_allclose(expression, expected.loc[ids].to_numpy(), rtol=1e-6)
    genes = pd.read_csv(tmp_path / "out" / "expression_genes.csv")
    assert list(genes["id"]) == [f"g{i}" for i in range(6)]

    signatures[signatures["pert_id"] != "docetaxel"].to_csv(tmp_path / "sig.csv", index=False)
    with pytest.raises(ValueError, match="docetaxel"):
        cli.main(args + ["--out", str(tmp_path / "out2")])
    assert not (tmp_path / "out2").exists()  # Paired before any image was read.
