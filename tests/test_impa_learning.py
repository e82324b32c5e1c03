"""IMPA learns the perturbation on the synthetic screen, end to end through the CLI:
build -> train -> sample -> embed -> evaluate (impa.txt, Methods "Evaluation")."""

import json
import os

import jax
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from morphjax import cli
from morphjax import config as cfg
from morphjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 600
TRAIN = [
    "mesh.data=1", "eval.moa_classifier_steps=300", "data.image_size=32", "model.dim_in=16", "model.max_conv_dim=64", "model.style_dim=16",
    "model.noise_dim=8", "train.batch_size=16", f"train.total_steps={STEPS}",
    "train.log_every=100", "train.eval_every=0", f"train.sample_every={STEPS}",
    f"train.checkpoint_every={STEPS}", f"loss.ds_decay_steps={STEPS}",
    "optimizer.learning_rate=0.0002"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny bbbc021_like screen (taxol, nocodazole, simvastatin, DMSO) and a trained IMPA."""
    from data_builders.raw_screen import build_raw_screen
    from data_builders.synthetic_screen import get_preset, simulate_screen

    root = tmp_path_factory.mktemp("impa_learning")
    preset = get_preset("bbbc021_like", "tiny")
    preset.layout.sites_per_well = 8
    simulate_screen(preset, None, root / "raw", seed=0, progress=False)
    build_raw_screen(root / "raw", root / "dataset", crop_size=64, test_fraction=0.3)
    workdir = str(root / "run")
    config = cfg.load_config(os.path.join(ROOT, "configs", "impa.py") + ":tiny",
                             [f"data.path={root / 'dataset'}", *TRAIN])
    loop.train(config, workdir, devices=jax.devices()[:1])  # 1 of the 8 fake devices: faster
    assert cli.main(["evaluate", "--workdir", workdir, "--out", str(root / "eval"),
                     "--samples", "80"]) == 0
    with open(root / "eval" / "metrics.json") as f:
        return root, workdir, json.load(f)


def test_generated_cells_match_treated_cells_better_than_controls(trained):
    _, _, result = trained
    cnn = result["feature_spaces"]["moa_cnn"]
    per = cnn["per_perturbation"]
    strongest = max(per, key=lambda p: per[p]["controls_baseline"]["fid"])
    assert result["perturbations"][strongest]["name"] == "taxol"
    entry = per[strongest]
    assert entry["generated"]["fid"] < 0.6 * entry["controls_baseline"]["fid"]
    assert entry["generated"]["kid"] < 0.8 * entry["controls_baseline"]["kid"]
    strong = cnn["summary"]["strong"]
    assert strong["generated"]["fid"] < strong["controls_baseline"]["fid"]
    # A classifier trained on real cells recognises the MoA of generated cells far more often
    # than that of the untransformed controls.
    moa = result["moa_accuracy"]
    assert moa["generated"] > moa["controls_baseline"] + 0.1


def test_generated_cells_move_classical_features_the_right_way(trained):
    _, _, result = trained
    per = result["feature_spaces"]["classical"]["per_perturbation"]
    taxol = next(p for p, info in result["perturbations"].items() if info["name"] == "taxol")
    assert per[taxol]["shift_cosine"] > 0.2
    assert per[taxol]["top_feature_sign_agreement"] >= 0.7


def test_evaluation_writes_tables_and_plots(trained):
    root, _, result = trained
    table = pd.read_csv(root / "eval" / "results.csv")
    assert set(table["kind"]) == {"generated", "controls_baseline"}
    assert set(table["space"]) == {"classical", "moa_cnn"}
    for name in ("style_space_pca.png", "feature_violins.png"):
        assert Image.open(root / "eval" / name).size[0] > 100
    assert result["run"]["step"] == STEPS


def test_sample_and_embed_commands(trained, tmp_path):
    _, workdir, _ = trained
    out = tmp_path / "samples"
    assert cli.main(["sample", "--workdir", workdir, "--perturbation", "taxol", "--n", "6",
                     "--interpolate-to", "nocodazole", "--out", str(out)]) == 0
    arrays = np.load(out / "taxol.npz")
    assert arrays["source"].shape == arrays["generated"].shape == (6, 32, 32, 3)
    assert arrays["generated"].dtype == np.uint8
    assert not np.array_equal(arrays["source"], arrays["generated"])
    assert Image.open(out / "taxol_to_nocodazole.png").size[0] > 8 * 32
    with pytest.raises(ValueError, match="not in the dataset"):
        cli.main(["sample", "--workdir", workdir, "--perturbation", "aspirin", "--out", str(out)])
    assert cli.main(["embed", "--workdir", workdir, "--out", str(tmp_path / "emb")]) == 0
    styles = pd.read_parquet(tmp_path / "emb" / "perturbation_styles.parquet")
    assert list(styles["Metadata_perturbation"]) == ["taxol", "nocodazole", "simvastatin"]
    assert styles.filter(like="style_").shape[1] == 16
