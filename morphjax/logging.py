"""Training-run logging: JSONL + TensorBoard scalars, progress bars and fluorescence image grids.

`metrics.jsonl` is the source of truth (one JSON object per line, readable with `read_metrics`,
pandas or jq); TensorBoard event files are a convenience view of the same scalars.
"""

import colorsys
import io
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from morphjax import io as mio

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"

# JSON has no NaN/infinity; metrics.jsonl stores them as these strings and read_metrics maps them back.
_JSON_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_RESERVED_KEYS = ("step", "time")

Scalar = float | int | np.ndarray | jax.Array


# ---------------------------------------------------------------------------------------------
# Scalars: metrics.jsonl + TensorBoard.
# ---------------------------------------------------------------------------------------------


class MetricWriter:
    """Appends scalars to `workdir/metrics.jsonl` and TensorBoard, from one process only.

    In multi-host runs every process computes the same (globally reduced) metrics, so only process 0
    writes by default; the others get a writer that does nothing and creates no files.

    Non-finite values are written as the JSON strings "nan", "inf" and "-inf" (JSON has no NaN), and
    `read_metrics` turns them back into floats. TensorBoard receives the float values unchanged.

    Reopening the workdir of a killed run appends to the same file; a truncated last line left by
    the kill is cut off first so that new lines do not get glued onto it.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool | None = None,
        tensorboard: bool = True,
    ):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self.metrics_path = os.path.join(self.workdir, METRICS_FILENAME)
        self._file = None
        self._tb = None
        self._closed = False
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        _cut_truncated_last_line(self.metrics_path)
        self._file = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # Imported here: slow, and unused when disabled.

            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIRNAME))

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Writes one JSONL line `{"step", "time", **scalars}` and the TensorBoard scalars."""
        if not self.enabled:
            return
        self._check_open()
        step = int(step)
        values = {}
        for key, value in scalars.items():
            if key in _RESERVED_KEYS:
                raise ValueError(f"Scalar name {key!r} is reserved in {METRICS_FILENAME}; rename it.")
            values[key] = _to_python_scalar(key, value)
        record = {"step": step, "time": time.time()}
        record.update({k: _json_safe(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=step)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes RGB uint8 (H, W, 3) images to TensorBoard; a no-op without TensorBoard."""
        if not self.enabled:
            return
        self._check_open()
        for key, image in images.items():
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"Image {key!r} must be uint8 of shape (H, W, 3), got {image.dtype} {image.shape}; "
                    "make one with image_grid()."
                )
            if self._tb is not None:
                self._tb.add_image(key, image, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._file is not None and not self._closed:
            self._file.flush()
            os.fsync(self._file.fileno())
        if self._tb is not None and not self._closed:
            self._tb.flush()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._closed = True

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricWriter for {self.workdir} is closed.")


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads `workdir/metrics.jsonl` back, with "nan"/"inf"/"-inf" strings turned into floats.

    A run killed mid-write can leave a truncated last line; it is skipped with a warning. A broken
    line anywhere else means the file is corrupt, and raises.
    """
    path = os.path.join(os.fspath(workdir), METRICS_FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No {METRICS_FILENAME} in {os.fspath(workdir)}; was anything logged there?")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a JSON object with a 'step' field")
        except ValueError as e:
            if lineno == len(lines):
                warnings.warn(f"Skipping truncated last line {lineno} of {path} (killed during a write?).")
                break
            raise ValueError(f"Corrupt line {lineno} of {path}: {e}: {line[:200]!r}") from e
        records.append({k: _from_json_safe(v) for k, v in record.items()})
    return records


def _to_python_scalar(key: str, value: Scalar) -> float | int:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Scalar {key!r} must have one element, got shape {array.shape}.")
    item = array.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, (int, float)):
        return item
    raise TypeError(f"Scalar {key!r} must be a real number, got {type(item).__name__} ({item!r}).")


def _json_safe(value: float | int) -> float | int | str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf" or "-inf".
    return value


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, str) and value in _JSON_TO_NONFINITE:
        return _JSON_TO_NONFINITE[value]
    return value


def _cut_truncated_last_line(path: str, chunk_size: int = 1 << 16) -> None:
    """Truncates `path` after its last newline, dropping a partial line left by a killed writer."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - chunk_size)
            f.seek(start)
            newline = f.read(end - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        f.seek(keep)
        partial = f.read(200)
        f.truncate(keep)
    warnings.warn(f"Removed a truncated last line from {path} (killed during a write?): {partial!r}")


# ---------------------------------------------------------------------------------------------
# Progress.
# ---------------------------------------------------------------------------------------------


class ProgressBar:
    """A tqdm bar on a terminal; plain log lines every `log_every` steps otherwise (CI, log files).

    Plain lines look like
      `train: step 200/1000 | 12.3 steps/s | 394 ex/s | eta 1m05s | loss 0.4321`
    with rates measured by wall clock since the previous line. Scalars are only read on those lines
    (and on tqdm postfix refreshes, also every `log_every` steps), so passing unfinished jax.Arrays
    every step does not make the host wait for the device each step.

    Only process 0 shows progress by default, as with MetricWriter.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        examples_per_step: int,
        desc: str = "train",
        log_every: int = 100,
        enabled: bool | None = None,
    ):
        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}.")
        self.total_steps = int(total_steps)
        self.examples_per_step = int(examples_per_step)
        self.desc = desc
        self.log_every = int(log_every)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._step = int(initial_step)
        self._mark_step = self._step
        self._mark_time = time.perf_counter()
        isatty = getattr(sys.stderr, "isatty", None)
        self._plain = not (isatty is not None and isatty())
        self._bar = None
        if self.enabled and not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self._step,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

    def update(self, step: int, **scalars: Scalar) -> None:
        """Moves progress to `step` (the number of steps done) and shows `scalars` when it logs."""
        step = int(step)
        if step < self._step:
            raise ValueError(f"Progress step went backwards: {step} after {self._step}.")
        crossed = step // self.log_every > self._step // self.log_every
        finished = step >= self.total_steps > self._step
        previous, self._step = self._step, step
        if not self.enabled:
            return
        if self._bar is not None:
            if crossed or finished:
                steps_per_s = self._measure_rate(step)
                postfix = {"ex/s": _format_rate(steps_per_s * self.examples_per_step)}
                postfix.update({k: _format_scalar(k, v) for k, v in scalars.items()})
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - previous)
            return
        if crossed or finished:
            steps_per_s = self._measure_rate(step)
            parts = [
                f"{self.desc}: step {step}/{self.total_steps}",
                f"{_format_rate(steps_per_s)} steps/s",
                f"{_format_rate(steps_per_s * self.examples_per_step)} ex/s",
                f"eta {_format_eta(self.total_steps - step, steps_per_s)}",
            ]
            parts += [f"{k} {_format_scalar(k, v)}" for k, v in scalars.items()]
            print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _measure_rate(self, step: int) -> float:
        now = time.perf_counter()
        elapsed = now - self._mark_time
        rate = (step - self._mark_step) / elapsed if elapsed > 0 else math.inf
        self._mark_step, self._mark_time = step, now
        return rate


def _format_rate(rate: float) -> str:
    if not math.isfinite(rate):
        return "?"
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def _format_eta(remaining_steps: int, steps_per_s: float) -> str:
    if remaining_steps <= 0:
        return "0s"
    if not (math.isfinite(steps_per_s) and steps_per_s > 0):
        return "?"
    seconds = int(round(remaining_steps / steps_per_s))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


def _format_scalar(key: str, value: Scalar) -> str:
    item = _to_python_scalar(key, value)
    if isinstance(item, int):
        return str(item)
    if item == 0 or not math.isfinite(item) or 1e-3 <= abs(item) < 1e4:
        return f"{item:.4f}"
    return f"{item:.3e}"


# ---------------------------------------------------------------------------------------------
# Image grids.
# ---------------------------------------------------------------------------------------------

_BLUE, _GREEN, _RED = (0.0, 0.0, 1.0), (0.0, 1.0, 0.0), (1.0, 0.0, 0.0)
_CYAN, _MAGENTA, _YELLOW = (0.0, 1.0, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0)
_ORANGE, _GRAY = (1.0, 0.5, 0.0), (1.0, 1.0, 1.0)

# Default colours by channel count. Channel 0 is DNA (Hoechst/DAPI) and shown blue, as in the field.
# 5: Cell Painting DNA, ER, RNA, AGP, Mito. 6: RxRx1 Hoechst, ConA (ER), Phalloidin (actin),
# Syto14 (RNA), MitoTracker, WGA. More channels get evenly spaced hues.
_DEFAULT_PALETTES = {
    1: (_GRAY,),
    2: (_BLUE, _GREEN),
    3: (_BLUE, _GREEN, _RED),
    4: (_BLUE, _GREEN, _RED, _MAGENTA),
    5: (_BLUE, _GREEN, _ORANGE, _RED, _MAGENTA),
    6: (_BLUE, _GREEN, _RED, _CYAN, _MAGENTA, _YELLOW),
}


def default_channel_colors(num_channels: int) -> tuple[tuple[float, float, float], ...]:
    """RGB colour in [0, 1] for each fluorescence channel, used for additive compositing."""
    if num_channels < 1:
        raise ValueError(f"Need at least one channel, got {num_channels}.")
    if num_channels in _DEFAULT_PALETTES:
        return _DEFAULT_PALETTES[num_channels]
    # Start at blue (hue 2/3) so channel 0 (DNA) stays blue.
    return tuple(
        tuple(float(x) for x in colorsys.hsv_to_rgb((2 / 3 + i / num_channels) % 1.0, 1.0, 1.0))
        for i in range(num_channels)
    )


def normalize_channels(images: np.ndarray, normalize: str = "percentile") -> np.ndarray:
    """Maps NHWC images to float [0, 1] per channel.

    "percentile": the 1st and 99th percentiles of each channel over the whole batch map to 0 and 1
      (clipped), so dim stains stay visible and all images in a grid share one scale. A constant
      channel maps to 0.
    "none": unsigned integers are divided by their dtype maximum (uint8 by 255); floats are assumed
      to be in [0, 1] and clipped.
    """
    images = np.asarray(images)
    if normalize == "percentile":
        x = images.astype(np.float64)
        lo, hi = np.percentile(x, [1.0, 99.0], axis=tuple(range(x.ndim - 1)))
        scale = np.where(hi > lo, hi - lo, 1.0)
        return np.clip((x - lo) / scale, 0.0, 1.0) * (hi > lo)
    if normalize == "none":
        if np.issubdtype(images.dtype, np.unsignedinteger):
            return images.astype(np.float64) / np.iinfo(images.dtype).max
        if np.issubdtype(images.dtype, np.floating) or images.dtype == np.bool_:
            return np.clip(images.astype(np.float64), 0.0, 1.0)
        raise ValueError(
            f"normalize='none' needs unsigned integer or float images, got {images.dtype}; "
            "use normalize='percentile'."
        )
    raise ValueError(f"Unknown normalize={normalize!r}; use 'percentile' or 'none'.")


def image_grid(
    images: np.ndarray,
    *,
    ncols: int | None = None,
    channel_colors: Sequence[tuple[float, float, float]] | None = None,
    normalize: str = "percentile",
    padding: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """Composites NHWC fluorescence images to RGB and tiles them, row by row, into one uint8 image.

    Channels are mixed additively: rgb = sum_c channel_c * colour_c, divided by its largest
    component where that exceeds 1 (keeps the hue of overlapping stains), with
    `default_channel_colors(C)` unless `channel_colors` is given. Image i goes to row i // ncols,
    column i % ncols; `ncols` defaults to ceil(sqrt(N)). Cells are separated by `padding` pixels
    of `pad_value`, which also fills unused cells.
    """
    rgb = _composite(images, channel_colors, normalize)
    n = rgb.shape[0]
    ncols = math.ceil(math.sqrt(n)) if ncols is None else int(ncols)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}.")
    return _tile(rgb, ncols, padding, pad_value)


def save_image_grid(path: str | os.PathLike, images: np.ndarray, **kwargs) -> np.ndarray:
    """Writes `image_grid(images, **kwargs)` to `path` as PNG, atomically; returns the grid."""
    grid = image_grid(images, **kwargs)
    _save_png(path, grid)
    return grid


def save_image_rows(
    path: str | os.PathLike,
    rows: Sequence[np.ndarray],
    row_labels: Sequence[str] | None = None,
    *,
    channel_colors: Sequence[tuple[float, float, float]] | None = None,
    normalize: str = "percentile",
    padding: int = 2,
    pad_value: int = 255,
) -> np.ndarray:
    """Writes rows of images (e.g. control / predicted / real) as one PNG; returns the image.

    All rows share one normalisation so that their brightness can be compared. Each row is an
    NHWC batch of the same shape; labels, if given, are drawn in a column on the left.
    """
    rows = [np.asarray(row) for row in rows]
    if not rows:
        raise ValueError("save_image_rows needs at least one row.")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"Got {len(row_labels)} row labels for {len(rows)} rows.")
    for i, row in enumerate(rows):
        if row.shape != rows[0].shape:
            name = f"{row_labels[i]!r} (row {i})" if row_labels is not None else f"row {i}"
            raise ValueError(f"Image row {name} has shape {row.shape}, but row 0 has {rows[0].shape}.")
    rgb = _composite(np.concatenate(rows), channel_colors, normalize)
    grid = _tile(rgb, rows[0].shape[0], padding, pad_value)
    if row_labels is not None:
        grid = _add_row_labels(
            grid, row_labels, cell_height=rows[0].shape[1], padding=padding, pad_value=pad_value
        )
    _save_png(path, grid)
    return grid


def _composite(images: np.ndarray, channel_colors, normalize: str) -> np.ndarray:
    """NHWC images -> NHW3 float RGB in [0, 1] by additive colour mixing."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"Expected NHWC images, got shape {images.shape}; add a batch or channel axis.")
    if images.shape[0] == 0:
        raise ValueError("Got an empty batch of images.")
    num_channels = images.shape[-1]
    if channel_colors is None:
        channel_colors = default_channel_colors(num_channels)
    colors = np.asarray(channel_colors, dtype=np.float64)
    if colors.ndim != 2 or colors.shape[1] != 3:
        raise ValueError(f"channel_colors must be a sequence of RGB triples, got shape {colors.shape}.")
    if colors.shape[0] != num_channels:
        raise ValueError(
            f"channel_colors has {colors.shape[0]} colours but the images have {num_channels} channels."
        )
    x = normalize_channels(images, normalize)
    rgb = np.einsum("nhwc,ck->nhwk", x, colors)
    # Where overlapping stains sum past 1, scale the pixel down instead of clipping each
    # component: clipping turns every 4-5-channel cytoplasm into the same saturated yellow/white.
    return rgb / np.maximum(rgb.max(axis=-1, keepdims=True), 1.0)


def _tile(rgb: np.ndarray, ncols: int, padding: int, pad_value: int) -> np.ndarray:
    n, h, w, _ = rgb.shape
    nrows = math.ceil(n / ncols)
    grid = np.full(
        (nrows * h + (nrows + 1) * padding, ncols * w + (ncols + 1) * padding, 3), pad_value, np.uint8
    )
    cells = np.round(rgb * 255.0).astype(np.uint8)
    for i in range(n):
        row, col = divmod(i, ncols)
        y = padding + row * (h + padding)
        x = padding + col * (w + padding)
        grid[y : y + h, x : x + w] = cells[i]
    return grid


def _add_row_labels(
    grid: np.ndarray, labels: Sequence[str], *, cell_height: int, padding: int, pad_value: int
) -> np.ndarray:
    """Prepends a column with one text label per row, vertically centred on the row."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(label), font=font) for label in labels]
    width = max(box[2] - box[0] for box in boxes) + 2 * max(padding, 4)
    column = Image.new("RGB", (width, grid.shape[0]), (pad_value,) * 3)
    draw = ImageDraw.Draw(column)
    text_color = (0, 0, 0) if pad_value >= 128 else (255, 255, 255)
    for i, (label, box) in enumerate(zip(labels, boxes)):
        center_y = padding + i * (cell_height + padding) + cell_height / 2
        xy = (max(padding, 4) - box[0], center_y - (box[3] - box[1]) / 2 - box[1])
        draw.text(xy, str(label), fill=text_color, font=font)
    return np.concatenate([np.asarray(column), grid], axis=1)


def _save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    mio.atomic_write_bytes(path, buffer.getvalue())
