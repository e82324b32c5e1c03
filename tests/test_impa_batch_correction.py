"""IMPA batch correction learns on the synthetic rxrx1_like screen (impa.txt, "Batch
correction"); its own file so the test runner can place it beside the IMPA learning run."""

import json
import os

import jax

from morphjax import cli
from morphjax import config as cfg
from morphjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_correction_confuses_the_batch_classifier(tmp_path):
    """IMPA batch correction (impa.txt, "Batch correction"): every test cell transferred to one
    reference batch; a batch classifier trained on real cells is fooled more than on originals."""
    from data_builders.raw_screen import build_raw_screen
    from data_builders.synthetic_screen import get_preset, simulate_screen

    preset = get_preset("rxrx1_like", "tiny")
    preset.layout.sites_per_well = 3
    simulate_screen(preset, None, tmp_path / "raw", seed=0, progress=False)
    build_raw_screen(tmp_path / "raw", tmp_path / "dataset", crop_size=64, test_fraction=0.3)
    steps = 300
    config = cfg.load_config(os.path.join(ROOT, "configs", "impa.py") + ":rxrx1_batch", [
        f"data.path={tmp_path / 'dataset'}", "mesh.data=1", "data.image_size=32",
        "model.dim_in=16", "model.max_conv_dim=64", "model.style_dim=16", "model.noise_dim=4",
        "model.learned_embedding_dim=8", "train.batch_size=16", f"train.total_steps={steps}",
        "train.log_every=100", "train.eval_every=0", "train.sample_every=0",
        f"train.checkpoint_every={steps}", f"loss.ds_decay_steps={steps}",
        "optimizer.learning_rate=0.0002", "eval.moa_classifier_steps=200",
        "eval.samples_per_perturbation=40"])
    loop.train(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert cli.main(["evaluate", "--workdir", str(tmp_path / "run"), "--out",
                     str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "metrics.json") as f:
        result = json.load(f)
    batch = result["batch_classifier"]
    assert batch["accuracy_original"] > 0.6  # the screen's batches are recognisable ...
    assert batch["accuracy_corrected"] < batch["accuracy_original"] - 0.2  # ... less so after
    assert batch["predicted_reference"] > 0.5  # most corrected cells read as the target batch
    mixing = result["feature_spaces"]["classical"]
    assert set(mixing["original"]) == {"silhouette_batch", "ilisi", "batch_entropy", "gini",
                                       "batch_knn_accuracy"}
