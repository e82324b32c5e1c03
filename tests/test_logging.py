"""Tests for morphjax.logging and morphjax.io: files written, read back and drawn as specified."""

import io
import json
import math
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from morphjax import io as mio
from morphjax import logging as mlog

# Expected palettes, written out here so that a change to the defaults is a deliberate one.
BLUE, GREEN, RED, ORANGE, MAGENTA = (0, 0, 1), (0, 1, 0), (1, 0, 0), (1, 0.5, 0), (1, 0, 1)
EXPECTED_PALETTES = {
    1: [(1, 1, 1)],
    3: [BLUE, GREEN, RED],
    5: [BLUE, GREEN, ORANGE, RED, MAGENTA],
}


def _reject_constant(name):
    raise AssertionError(f"invalid JSON constant {name} in metrics.jsonl")


# ---------------------------------------------------------------------------------------------
# MetricWriter / read_metrics.
# ---------------------------------------------------------------------------------------------


def test_jsonl_round_trip_with_nonfinite_values(tmp_path):
    with mlog.MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write_scalars(
            1,
            {
                "loss": np.float32(0.5),
                "lr": jnp.asarray(1e-4),
                "count": np.int64(7),
                "nan_loss": float("nan"),
                "grad_norm": np.float32("inf"),
                "neg": -math.inf,
            },
        )
        writer.write_scalars(jnp.asarray(2), {"loss": jnp.asarray([0.25])})

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for line in lines:  # Strict JSON: no bare NaN/Infinity tokens.
        json.loads(line, parse_constant=_reject_constant)
    assert json.loads(lines[0])["nan_loss"] == "nan"

    records = mlog.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    first = records[0]
    assert first["loss"] == 0.5
    assert first["lr"] == pytest.approx(1e-4)
    assert first["count"] == 7 and isinstance(first["count"], int)
    assert math.isnan(first["nan_loss"])
    assert first["grad_norm"] == math.inf
    assert first["neg"] == -math.inf
    assert records[1]["loss"] == 0.25
    assert abs(first["time"] - time.time()) < 600


def test_write_scalars_rejects_bad_values(tmp_path):
    with mlog.MetricWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="'per_class'.*shape \\(3,\\)"):
            writer.write_scalars(1, {"per_class": np.zeros(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write_scalars(1, {"step": 3})
    with pytest.raises(RuntimeError, match="closed"):
        writer.write_scalars(2, {"loss": 1.0})


def test_truncated_last_line_is_skipped_and_cut_on_reopen(tmp_path):
    with mlog.MetricWriter(tmp_path, tensorboard=False) as writer:
        for step in (1, 2, 3):
            writer.write_scalars(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "time": 17000.5, "lo')  # A write cut short by a kill.

    with pytest.warns(UserWarning, match="truncated last line 4"):
        records = mlog.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]

    # Resuming in the same workdir must not glue the new line onto the partial one.
    with pytest.warns(UserWarning, match="Removed a truncated last line"):
        writer = mlog.MetricWriter(tmp_path, tensorboard=False)
    with writer:
        writer.write_scalars(4, {"loss": 0.25})
    records = mlog.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 0.25


def test_corrupt_middle_line_raises_naming_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": \n{"step": 3, "loss": 0.5}\n'
    )
    with pytest.raises(ValueError, match="line 2 of"):
        mlog.read_metrics(tmp_path)


def test_read_metrics_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        mlog.read_metrics(tmp_path / "nowhere")


def test_tensorboard_scalars_and_images_read_back(tmp_path):
    grid = np.zeros((6, 10, 3), np.uint8)
    grid[:, :5, 0] = 255
    with mlog.MetricWriter(tmp_path, enabled=True) as writer:
        for step in (0, 10, 20):
            writer.write_scalars(step, {"train/loss": 1.0 / (step + 1), "train/acc": jnp.asarray(step / 100)})
        writer.write_images(20, {"samples": grid})

    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={event_accumulator.IMAGES: 0}
    )
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [0, 10, 20]
    np.testing.assert_allclose([e.value for e in loss], [1.0, 1 / 11, 1 / 21], rtol=1e-6)
    np.testing.assert_allclose([e.value for e in acc.Scalars("train/acc")], [0.0, 0.1, 0.2], rtol=1e-6)

    (image_event,) = acc.Images("samples")
    assert image_event.step == 20
    decoded = np.asarray(Image.open(io.BytesIO(image_event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grid)


def test_write_images_rejects_non_rgb_uint8(tmp_path):
    with mlog.MetricWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match="'raw'.*image_grid"):
            writer.write_images(0, {"raw": np.zeros((8, 8, 5), np.uint8)})


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with mlog.MetricWriter(workdir, enabled=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_images(1, {"grid": np.zeros((4, 4, 3), np.uint8)})
        writer.flush()
    assert not workdir.exists()


def test_only_process_zero_writes_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with mlog.MetricWriter(tmp_path / "host1") as writer:
        writer.write_scalars(1, {"loss": 1.0})
    assert not (tmp_path / "host1").exists()

    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with mlog.MetricWriter(tmp_path / "host0", tensorboard=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
    assert [r["loss"] for r in mlog.read_metrics(tmp_path / "host0")] == [1.0]


# ---------------------------------------------------------------------------------------------
# Image grids.
# ---------------------------------------------------------------------------------------------


def _reference_composite(values_01, palette):
    """values_01: (N, C) per-image constant channel values in [0, 1] -> (N, 3) uint8 colours."""
    rgb = values_01 @ np.asarray(palette, np.float64)
    rgb = rgb / np.maximum(rgb.max(axis=1, keepdims=True), 1.0)  # hue kept where stains overlap
    return np.round(rgb * 255).astype(np.uint8)


@pytest.mark.parametrize("num_channels", [1, 3, 5])
def test_image_grid_places_each_image_in_its_cell(num_channels):
    rng = np.random.default_rng(num_channels)
    n, h, w, ncols, padding = 5, 4, 3, 3, 2
    values = rng.integers(0, 256, size=(n, num_channels), dtype=np.uint8)
    images = np.broadcast_to(values[:, None, None, :], (n, h, w, num_channels)).copy()

    grid = mlog.image_grid(images, ncols=ncols, normalize="none", padding=padding)

    assert grid.dtype == np.uint8
    assert grid.shape == (2 * h + 3 * padding, ncols * w + (ncols + 1) * padding, 3)
    expected = _reference_composite(values / 255.0, EXPECTED_PALETTES[num_channels])
    occupied = np.zeros(grid.shape[:2], bool)
    for i in range(n):
        row, col = divmod(i, ncols)  # Rows fill left to right.
        y, x = padding + row * (h + padding), padding + col * (w + padding)
        cell = grid[y : y + h, x : x + w]
        np.testing.assert_array_equal(cell, np.broadcast_to(expected[i], cell.shape), err_msg=f"image {i}")
        occupied[y : y + h, x : x + w] = True
    # Padding and the unused sixth cell are background.
    assert np.all(grid[~occupied] == 255)


def test_image_grid_custom_colours_and_mismatch_error():
    images = np.zeros((2, 2, 2, 2), np.float32)
    images[0, ..., 0] = 1.0
    images[1, ..., 1] = 0.5
    colors = [(1.0, 1.0, 0.0), (0.0, 1.0, 1.0)]
    grid = mlog.image_grid(images, ncols=2, channel_colors=colors, normalize="none", padding=0)
    np.testing.assert_array_equal(grid[0, 0], [255, 255, 0])
    np.testing.assert_array_equal(grid[0, 2], [0, 128, 128])

    with pytest.raises(ValueError, match="3 colours but the images have 2 channels"):
        mlog.image_grid(images, channel_colors=colors + [(1.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="NHWC"):
        mlog.image_grid(images[0])


def test_default_palette_for_many_channels_keeps_dna_blue():
    colors = mlog.default_channel_colors(8)
    assert len(colors) == 8 and len(set(colors)) == 8
    np.testing.assert_allclose(colors[0], BLUE, atol=1e-9)


def test_percentile_normalisation_matches_numpy():
    rng = np.random.default_rng(0)
    images = rng.gamma(2.0, size=(6, 8, 8, 3)) * np.array([1.0, 50.0, 1000.0])
    images[..., 2] = 7.0  # A constant channel has no range and maps to 0.

    normalized = mlog.normalize_channels(images, "percentile")
    for c in range(2):
        lo, hi = np.percentile(images[..., c], [1, 99])
        np.testing.assert_allclose(normalized[..., c], np.clip((images[..., c] - lo) / (hi - lo), 0, 1))
    assert np.all(normalized[..., 2] == 0)

    # Through image_grid, a single gray channel shows the normalised value on all of R, G, B.
    gray = images[..., :1]
    lo, hi = np.percentile(gray, [1, 99])
    grid = mlog.image_grid(gray, ncols=6, padding=0)
    expected = np.round(np.clip((gray[..., 0] - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(grid[:, :, 0], np.concatenate(list(expected), axis=1))
    np.testing.assert_array_equal(grid[..., 0], grid[..., 2])


def test_normalize_none_scales_uint16_and_rejects_unknown_mode():
    images = np.full((1, 2, 2, 1), 65535, np.uint16)
    assert np.all(mlog.normalize_channels(images, "none") == 1.0)
    with pytest.raises(ValueError, match="'minmax'"):
        mlog.normalize_channels(images, "minmax")


def test_save_image_grid_writes_png_atomically(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(4, 5, 5, 5), dtype=np.uint8)
    path = tmp_path / "grids" / "step_100.png"
    grid = mlog.save_image_grid(path, images, ncols=2)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    assert os.listdir(path.parent) == ["step_100.png"]


def test_save_image_rows_shares_normalisation_and_labels_rows(tmp_path):
    rng = np.random.default_rng(2)
    rows = [rng.random((3, 16, 16, 5)).astype(np.float32) * scale for scale in (1.0, 2.0)]
    path = tmp_path / "rows.png"

    plain = mlog.save_image_rows(path, rows)
    np.testing.assert_array_equal(plain, mlog.image_grid(np.concatenate(rows), ncols=3))

    labelled = mlog.save_image_rows(path, rows, row_labels=["control", "predicted"])
    np.testing.assert_array_equal(np.asarray(Image.open(path)), labelled)
    label_width = labelled.shape[1] - plain.shape[1]
    assert label_width > 0
    np.testing.assert_array_equal(labelled[:, label_width:], plain)
    for row in range(2):  # Each row's label is drawn beside that row.
        band = labelled[2 + row * 18 : 2 + row * 18 + 16, :label_width]
        assert band.min() < 128, f"no label text next to row {row}"

    with pytest.raises(ValueError, match="'real' \\(row 1\\)"):
        mlog.save_image_rows(path, [rows[0], rows[1][:2]], row_labels=["control", "real"])


# ---------------------------------------------------------------------------------------------
# Atomic writes.
# ---------------------------------------------------------------------------------------------


def test_atomic_write_json_round_trip_leaves_no_temp_files(tmp_path):
    obj = {"fid": np.float32(12.5), "map": jnp.asarray([0.5, 0.25]), "name": "impa", "n": np.int64(3)}
    path = tmp_path / "eval" / "metrics.json"
    mio.atomic_write_json(path, obj)
    mio.atomic_write_json(path, obj)  # Overwrite in place.
    assert json.loads(path.read_text()) == {"fid": 12.5, "map": [0.5, 0.25], "name": "impa", "n": 3}
    assert os.listdir(path.parent) == ["metrics.json"]

    mio.atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"


def test_atomic_write_json_refuses_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    mio.atomic_write_json(path, {"fid": 1.0})
    with pytest.raises(ValueError, match="metrics.json"):
        mio.atomic_write_json(path, {"fid": float("nan")})
    assert json.loads(path.read_text()) == {"fid": 1.0}


def test_interrupted_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.bin"
    mio.atomic_write_bytes(path, b"old")

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        mio.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.bin"]


# ---------------------------------------------------------------------------------------------
# ProgressBar.
# ---------------------------------------------------------------------------------------------

LINE = re.compile(
    r"^(\w+): step (\d+)/(\d+) \| ([\d.]+) steps/s \| ([\d.]+) ex/s \| eta (\S+)(?: \| (.*))?$"
)


class FakeTime:
    """Stands in for the `time` module inside morphjax.logging: a clock that only moves when told."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now

    def time(self):
        return self.now


def _parse(out):
    return [LINE.match(line).groups() for line in out.strip().splitlines()]


def test_progress_plain_lines_at_log_steps_with_exact_rates(capsys, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(mlog, "time", clock)
    with mlog.ProgressBar(10_000, examples_per_step=32, log_every=100) as bar:
        for step in range(1, 301):
            clock.now += 0.1 if 100 < step <= 200 else 0.05  # 20, then 10, then 20 steps/s.
            bar.update(step, loss=jnp.asarray(1.0 / step), lr=1e-5)

    lines = _parse(capsys.readouterr().out)
    assert [(desc, int(step), int(total)) for desc, step, total, *_ in lines] == [
        ("train", 100, 10_000),
        ("train", 200, 10_000),
        ("train", 300, 10_000),
    ]
    # Each rate covers only the steps since the previous line.
    assert [float(line[3]) for line in lines] == pytest.approx([20.0, 10.0, 20.0])
    _, _, _, steps_per_s, examples_per_s, eta, scalars = lines[0]
    assert float(steps_per_s) == pytest.approx(20.0)
    assert float(examples_per_s) == pytest.approx(640.0)
    assert eta == "8m15s"  # 9900 steps left at 20 steps/s.
    assert scalars == "loss 0.0100 | lr 1.000e-05"


def test_progress_plain_resume_uneven_updates_and_final_step(capsys, monkeypatch):
    clock = FakeTime()
    monkeypatch.setattr(mlog, "time", clock)
    bar = mlog.ProgressBar(560, initial_step=300, examples_per_step=8, desc="eval", log_every=100)
    for step in range(303, 561, 3):  # Steps 303, 306, ..., 558, then the last one.
        clock.now += 0.3  # 10 steps/s.
        bar.update(step)
    clock.now += 0.2
    bar.update(560)
    bar.close()

    lines = _parse(capsys.readouterr().out)
    # A line at the first update past each multiple of 100, and one at the end.
    assert [(desc, int(step)) for desc, step, *_ in lines] == [("eval", 402), ("eval", 501), ("eval", 560)]
    assert [float(line[3]) for line in lines] == pytest.approx([10.0, 10.0, 10.0])
    assert [line[5] for line in lines] == ["16s", "6s", "0s"]
    assert lines[0][6] is None

    with pytest.raises(ValueError, match="backwards: 10 after 560"):
        bar.update(10)


def test_progress_real_clock_rate_is_plausible(capsys):
    with mlog.ProgressBar(20, examples_per_step=4, log_every=10) as bar:
        for step in range(1, 21):
            time.sleep(0.002)
            bar.update(step, loss=0.5)
    lines = _parse(capsys.readouterr().out)
    assert [int(line[1]) for line in lines] == [10, 20]
    for line in lines:
        assert 0 < float(line[3]) <= 500  # Each step slept at least 2 ms.
        assert float(line[4]) == pytest.approx(4 * float(line[3]), rel=0.02)


def test_progress_disabled_prints_nothing(capsys):
    with mlog.ProgressBar(100, examples_per_step=1, log_every=10, enabled=False) as bar:
        for step in range(1, 101):
            bar.update(step, loss=1.0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_uses_tqdm_on_a_terminal(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    with mlog.ProgressBar(50, examples_per_step=16, log_every=10) as bar:
        for step in range(1, 51):
            bar.update(step, loss=0.125)
    assert capsys.readouterr().out == ""  # No plain lines on a terminal.
    shown = terminal.getvalue()
    assert "50/50" in shown and "ex/s" in shown and "loss=0.1250" in shown
