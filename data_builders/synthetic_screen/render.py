"""Cell renderer of the synthetic screen: fluorescence fields of view from per-cell phenotypes.

All cells are drawn at once, vectorised with NumPy over one flat list of pixels (each cell's disc
of radius `extent`): an irregular cell body (radial harmonics) that competes with its neighbours
for pixels (power-diagram ownership, so touching cells share borders instead of overlapping), one
to four elliptical nuclei plus micronuclei, and per-compartment structures textured by sampling
fixed periodic noise tiles at per-cell random offsets and rotations (chromatin, nucleoli, ER
reticulum, mitochondrial tubules/puncta, actin fibres/aggregates, radial microtubules, Golgi,
gH2AX foci). The structures follow the Cell Painting stains (Bray et al. 2016, Nat. Protoc.,
Table 1). The image is then formed as a microscope would: optical blur, illumination field x gain,
background offset, Poisson photon noise and Gaussian read noise, 16-bit counts.

Coordinates: x is the column and y the row, with pixel centres at integer coordinates.
"""

import dataclasses
import functools
import zlib
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from data_builders.synthetic_screen.phenotype import PHENOTYPE

CHANNEL_STRUCTURES: dict[str, str] = {
    "DNA": "nucleus",
    "DAPI": "nucleus",
    "Hoechst": "nucleus",
    "ER": "er",
    "ConA": "er",
    "RNA": "rna",
    "Syto14": "rna",
    "AGP": "agp",
    "Mito": "mito",
    "MitoTracker": "mito",
    "Tubulin": "tubulin",
    "Actin": "actin",
    "Phalloidin": "actin",
    "gH2AX": "gh2ax",
    "WGA": "membrane",
}
# What each structure key means: nucleus = DNA stain; er = endoplasmic reticulum (ConA);
# rna = nucleoli + cytoplasmic RNA (SYTO14); agp = actin + Golgi + plasma membrane (phalloidin +
# WGA); mito = mitochondria; tubulin = microtubules; actin = F-actin; gh2ax = DNA damage foci;
# membrane = plasma membrane + Golgi (WGA).

NUCLEUS_RADIUS = 10.0  # Pixels at cell_scale 1 (a ~15 um nucleus at 20x, 0.65 um/px).
CELL_RADIUS = 28.0  # Pixels at cell_scale 1.
CELLS_PER_MEGAPIXEL = 230.0  # In-view density of a typical site at cell_scale 1 (~60 per 512^2).
SIGNAL_SCALE = 3000.0  # Counts of a bright structure (intensity 1) at gain 1.
MEDIUM_BACKGROUND = 0.03  # Medium autofluorescence (relative), lit by the illumination field.
MAX_COUNT = 65535

_TILE = 256  # Texture tiles are periodic, _TILE x _TILE, indexed with `& _MASK`.
_MASK = _TILE - 1
_POSITIVE = 8 * _TILE  # Shift that keeps texture coordinates positive before the mask.


@dataclasses.dataclass(eq=False)
class Technical:
    """Per-site technical effects; a plate or batch effect is made by sharing them across sites."""

    gain: np.ndarray  # (C,) multiplicative per channel.
    offset: np.ndarray  # (C,) additive background per channel, in counts.
    gradient: np.ndarray  # (2,) illumination gradient (x, y): field is 1 +- g at the edges.
    vignetting: float  # Relative darkening at the corners (field x (1 - vignetting) there).
    photon_scale: float  # Photons per count (Poisson noise); higher = less noise.
    read_noise: float  # Gaussian read noise sigma, in counts.
    blur_sigma: float  # Optical blur, Gaussian sigma in pixels.

    def __post_init__(self):
        self.gain = np.asarray(self.gain, dtype=np.float64)
        self.offset = np.asarray(self.offset, dtype=np.float64)
        self.gradient = np.asarray(self.gradient, dtype=np.float64)
        if self.gain.ndim != 1 or self.offset.shape != self.gain.shape:
            raise ValueError(
                f"Technical: gain {self.gain.shape} and offset {self.offset.shape} must both "
                "have shape (num_channels,)."
            )
        if self.gradient.shape != (2,):
            raise ValueError(f"Technical: gradient must have shape (2,), not {self.gradient.shape}")
        for name in ("vignetting", "photon_scale", "read_noise", "blur_sigma"):
            setattr(self, name, float(getattr(self, name)))
        checks = {
            "gain > 0": np.all(self.gain > 0),
            "offset finite": np.all(np.isfinite(self.offset)),
            "gradient finite": np.all(np.isfinite(self.gradient)),
            "0 <= vignetting < 1": 0 <= self.vignetting < 1,
            "photon_scale > 0": self.photon_scale > 0,
            "read_noise >= 0": self.read_noise >= 0,
            "blur_sigma >= 0": self.blur_sigma >= 0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"Technical: invalid values, need {', '.join(failed)}: {self}.")


def default_technical(num_channels: int) -> Technical:
    """Neutral technical effects: unit gain, flat illumination, moderate noise, slight blur."""
    return Technical(
        gain=np.ones(num_channels),
        offset=np.full(num_channels, 100.0),
        gradient=np.zeros(2),
        vignetting=0.0,
        photon_scale=1.0,
        read_noise=3.0,
        blur_sigma=1.0,
    )


def illumination_field(technical: Technical, image_size: tuple[int, int]) -> np.ndarray:
    """(H, W) multiplicative field: (1 + gx*x + gy*y) * (1 - vignetting * (x^2 + y^2) / 2).

    x and y run from -1 to 1 across the image, so the field is 1 at the centre, 1 +- g at the
    edge midpoints and (1 - vignetting) at the corners without gradient.
    """
    height, width = _check_image_size(image_size)
    y = np.linspace(-1.0, 1.0, height)[:, None] if height > 1 else np.zeros((1, 1))
    x = np.linspace(-1.0, 1.0, width)[None, :] if width > 1 else np.zeros((1, 1))
    gx, gy = technical.gradient
    field = (1.0 + gx * x + gy * y) * (1.0 - technical.vignetting * (x**2 + y**2) / 2.0)
    if field.min() <= 0:
        raise ValueError(
            f"Illumination field is not positive everywhere (gradient {technical.gradient}, "
            f"vignetting {technical.vignetting}); need |gx| + |gy| < 1."
        )
    return field


@dataclasses.dataclass(eq=False)
class RenderedSite:
    """One rendered field of view and where its cells are."""

    images: np.ndarray  # uint16 (C, H, W).
    centres: np.ndarray  # float (n_in_view, 2) x, y of nucleus centres inside the image.
    cell_index: np.ndarray  # int (n_in_view,) row of `phenotypes` each centre belongs to.


def channel_structure(channel: str) -> str:
    """Structure key that `channel` stains (see CHANNEL_STRUCTURES)."""
    try:
        return CHANNEL_STRUCTURES[channel]
    except KeyError:
        raise ValueError(
            f"Unknown channel {channel!r}; the renderer knows: {', '.join(CHANNEL_STRUCTURES)}."
        ) from None


def expected_cell_count(
    image_size: tuple[int, int] = (512, 512), cell_scale: float = 1.0, density: float = 1.0
) -> int:
    """Number of cells to pass to `render_site` for a typical site (`density` 1), margin included.

    `render_site` spreads the cells over the image plus a margin on every side; about
    CELLS_PER_MEGAPIXEL * H * W / cell_scale^2 * density of them land in view.
    """
    height, width = _check_image_size(image_size)
    margin = _margin(cell_scale)
    area = (height + 2 * margin) * (width + 2 * margin)
    return int(round(CELLS_PER_MEGAPIXEL * 1e-6 * density * area / cell_scale**2))


def render_site(
    phenotypes: np.ndarray,
    channels: Sequence[str],
    *,
    image_size: tuple[int, int] = (512, 512),
    technical: Technical,
    rng: np.random.Generator,
    cell_scale: float = 1.0,
) -> RenderedSite:
    """Renders one field of view of the cells `phenotypes` ((n, P), columns in PHENOTYPE order).

    The cells are placed at random with blue-noise spacing over the image plus a margin, so that
    cells cut by the border have neighbours partly in view; only centres inside the image are
    returned. `cell_scale` scales every length (cells, textures); phenotype values are clipped
    to [-4, 4]. The result is a deterministic function of the rng state, which advances by one
    draw. The layout, texture and noise draws do not depend on the phenotype values, nor on the
    other channels, so two renders from equal rng states differ only where phenotypes differ,
    and a channel's image is the same whichever channels are rendered with it.
    """
    phenotypes = np.asarray(phenotypes, dtype=np.float64)
    if phenotypes.ndim != 2 or phenotypes.shape[1] != len(PHENOTYPE):
        raise ValueError(
            f"render_site: phenotypes has shape {phenotypes.shape}; expected (n, {len(PHENOTYPE)}) "
            "with columns in PHENOTYPE order."
        )
    if not np.all(np.isfinite(phenotypes)):
        rows = np.flatnonzero(~np.isfinite(phenotypes).all(axis=1))
        raise ValueError(f"render_site: phenotypes are not finite in rows {rows[:10].tolist()}.")
    if isinstance(channels, str):
        raise ValueError(f"render_site: channels must be a sequence of names, got {channels!r}.")
    structures = [channel_structure(c) for c in channels]
    if not structures:
        raise ValueError("render_site: no channels given.")
    height, width = _check_image_size(image_size)
    if technical.gain.shape != (len(channels),):
        raise ValueError(
            f"render_site: technical has {technical.gain.shape[0]} channel gains for "
            f"{len(channels)} channels {list(channels)}."
        )
    if not cell_scale > 0:
        raise ValueError(f"render_site: cell_scale must be > 0, got {cell_scale}.")

    seed = int(rng.integers(0, 2**63 - 1))
    n = len(phenotypes)
    centres = _place_cells(n, (height, width), cell_scale, np.random.default_rng([seed, 0]))
    # The signal extends past the image by the blur's reach, so that blur sees what lies outside.
    reach = int(np.ceil(4.0 * technical.blur_sigma))
    signal = np.zeros((len(channels), height + 2 * reach, width + 2 * reach), np.float32)
    if n:
        _draw_cells(signal, phenotypes, centres + reach, structures, cell_scale, seed)
    images = _form_image(signal, channels, technical, reach, seed)
    x, y = centres[:, 0], centres[:, 1]
    in_view = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    return RenderedSite(
        images=images, centres=centres[in_view], cell_index=np.flatnonzero(in_view)
    )


# ---------------------------------------------------------------------------------------------
# Layout.
# ---------------------------------------------------------------------------------------------


def _check_image_size(image_size) -> tuple[int, int]:
    size = tuple(int(s) for s in image_size)
    if len(size) != 2 or min(size) < 1 or size != tuple(image_size):
        raise ValueError(f"image_size must be two positive integers (H, W), got {image_size!r}.")
    return size


def _margin(cell_scale: float) -> float:
    return 0.8 * CELL_RADIUS * cell_scale


def _place_cells(n, image_size, cell_scale, rng) -> np.ndarray:
    """(n, 2) x, y centres: Mitchell's best-candidate sampling, a cheap Poisson-disc spacing."""
    height, width = image_size
    margin = _margin(cell_scale)
    low = np.array([-margin, -margin])
    span = np.array([width - 1 + 2 * margin, height - 1 + 2 * margin])
    candidates = low + rng.random((n, 10, 2)) * span
    centres = candidates[:, 0].copy()
    for i in range(1, n):  # Keep the candidate farthest from the cells placed so far.
        d2 = ((candidates[i, :, None, :] - centres[None, :i, :]) ** 2).sum(-1).min(axis=1)
        centres[i] = candidates[i, np.argmax(d2)]
    return centres


# ---------------------------------------------------------------------------------------------
# Per-cell geometry from the phenotype.
# ---------------------------------------------------------------------------------------------

_MAX_FRAGMENTS = 8
_HARMONICS = (2, 3, 4, 5)


def _smoothstep(t):
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _geometry(phenotypes, cell_scale, rng) -> dict[str, np.ndarray]:
    """Sizes, shapes, counts and nuclear objects of each cell; random draws depend only on n."""
    n = len(phenotypes)
    v = {name: np.clip(phenotypes[:, i], -4.0, 4.0) for i, name in enumerate(PHENOTYPE)}
    # Random draws first, with shapes that depend on n only.
    angle = rng.uniform(0, np.pi, n)
    harmonic_amp = rng.uniform(0.3, 1.0, (n, len(_HARMONICS)))
    harmonic_phase = rng.uniform(0, 2 * np.pi, (n, len(_HARMONICS)))
    body_dir = rng.uniform(0, 2 * np.pi, n)
    body_shift = rng.uniform(0.0, 1.0, n)
    nuclei_jitter = rng.uniform(-0.35, 0.35, (n, 4))
    nuclei_angle = rng.uniform(0, np.pi, (n, 4))
    frag_angle = rng.uniform(0, 2 * np.pi, (n, _MAX_FRAGMENTS))
    frag_dist = rng.uniform(1.05, 1.7, (n, _MAX_FRAGMENTS))
    frag_size = rng.uniform(0.25, 0.45, (n, _MAX_FRAGMENTS))
    golgi_angle = rng.uniform(0, 2 * np.pi, n)

    mitotic = _smoothstep((v["mitotic_rounding"] - 0.9) / 0.2)
    n_nuclei = 1 + np.clip(np.floor(v["multinucleation"]), 0, 3).astype(int)
    n_frag = np.clip(np.floor(3.0 * (v["nuclear_fragmentation"] - 0.4)), 0, 8).astype(int)

    nuc_radius = (
        NUCLEUS_RADIUS
        * cell_scale
        * np.exp(0.24 * v["nuclear_size"])
        * (1.0 - 0.35 * mitotic)
        / (1.0 + 0.08 * n_frag)
    )
    sub_radius = nuc_radius * n_nuclei**-0.25  # Total nuclear area grows as sqrt(n).
    ratio = np.clip(np.exp(-0.25 - 0.3 * v["nuclear_eccentricity"]), 0.25, 1.0)
    ratio = ratio + (0.85 - ratio) * mitotic
    semi_a, semi_b = sub_radius / np.sqrt(ratio), sub_radius * np.sqrt(ratio)

    # Nuclear objects: nuclei 0..n_nuclei-1 around the centre, then fragments further out.
    # Several nuclei sit 0.8 radii from their centroid (inside each of them, so the reported
    # centre is on DNA) in random orientations, touching each other.
    m = 4 + _MAX_FRAGMENTS
    obj = {k: np.zeros((n, m)) for k in ("x", "y", "a", "b", "angle", "bright")}
    valid = np.zeros((n, m), bool)
    idx = np.arange(4)[None, :]
    valid[:, :4] = idx < n_nuclei[:, None]
    turn = angle[:, None] + 2 * np.pi * idx / n_nuclei[:, None] + nuclei_jitter
    dist = np.where(n_nuclei > 1, 0.8 * np.minimum(sub_radius, semi_b / 0.9), 0.0)
    x, y = dist[:, None] * np.cos(turn), dist[:, None] * np.sin(turn)
    x -= np.sum(x * valid[:, :4], axis=1, keepdims=True) / n_nuclei[:, None]
    y -= np.sum(y * valid[:, :4], axis=1, keepdims=True) / n_nuclei[:, None]
    obj["x"][:, :4], obj["y"][:, :4] = x, y
    obj["angle"][:, :4] = np.where(n_nuclei[:, None] > 1, nuclei_angle, angle[:, None])
    obj["a"][:, :4] = semi_a[:, None]
    obj["b"][:, :4] = semi_b[:, None]
    bright = 1.0 + 1.0 * mitotic + 0.08 * n_frag
    obj["bright"][:, :4] = bright[:, None]
    valid[:, 4:] = np.arange(_MAX_FRAGMENTS)[None, :] < n_frag[:, None]
    frag_r = frag_size * nuc_radius[:, None]
    frag_d = frag_dist * semi_a[:, None] + frag_r + dist[:, None]
    obj["x"][:, 4:] = frag_d * np.cos(frag_angle)
    obj["y"][:, 4:] = frag_d * np.sin(frag_angle)
    obj["a"][:, 4:] = frag_r * 1.05
    obj["b"][:, 4:] = frag_r / 1.05
    obj["angle"][:, 4:] = frag_angle
    obj["bright"][:, 4:] = 1.4
    reach = np.hypot(obj["x"], obj["y"]) + obj["a"]
    nuclear_extent = np.where(valid, reach, 0.0).max(axis=1)

    # Golgi: a ribbon on one side of the nucleus, spreading out when dispersed.
    dispersal = np.clip(v["golgi_dispersal"], -1.0, 4.0)
    spread, compact = np.maximum(dispersal, 0.0), np.minimum(dispersal, 0.0)
    golgi_sigma = 0.45 * nuc_radius * (1.0 + 0.5 * spread + 0.2 * compact)
    golgi_dist = (1.0 + 0.25 * spread) * semi_a + dist
    golgi_x, golgi_y = golgi_dist * np.cos(golgi_angle), golgi_dist * np.sin(golgi_angle)
    golgi_extent = golgi_dist + 2.5 * golgi_sigma

    # Cell body: radial harmonics; roundness damps them, mitosis makes the cell round and small.
    irregular = np.exp(-0.8 * v["cell_roundness"]) * (1.0 - mitotic)
    amps = np.empty((n, len(_HARMONICS)))
    amps[:, 0] = np.clip(0.22 * irregular, 0.0, 0.5)
    amps[:, 1:] = np.clip(0.07 * irregular[:, None] * harmonic_amp[:, 1:], 0.0, 0.15)
    amps *= np.minimum(1.0, 0.75 / np.maximum(amps.sum(axis=1), 1e-9))[:, None]
    phases = harmonic_phase.copy()
    phases[:, 0] = 2 * angle  # Elongated along the nucleus's long axis.
    cell_radius = (
        CELL_RADIUS
        * cell_scale
        * np.exp(0.2 * v["cell_size"])
        * n_nuclei**0.25
        * (1.0 - 0.4 * mitotic)
    )
    cell_radius = np.maximum(cell_radius, 1.3 * nuclear_extent / np.maximum(1 - amps.sum(1), 0.6))
    shift = 0.12 * cell_radius * body_shift * (1.0 - mitotic)
    body_x, body_y = shift * np.cos(body_dir), shift * np.sin(body_dir)
    extent = cell_radius * (1.0 + amps.sum(axis=1)) + shift + 1.0

    return dict(
        v=v,
        mitotic=mitotic,
        angle=angle,
        objects=obj,
        valid=valid,
        nuclear_extent=np.maximum(nuclear_extent, golgi_extent),
        golgi_x=golgi_x,
        golgi_y=golgi_y,
        golgi_sigma=golgi_sigma,
        dispersal=dispersal,
        amps=amps,
        phases=phases,
        cell_radius=cell_radius,
        body_x=body_x,
        body_y=body_y,
        extent=extent,
    )


# ---------------------------------------------------------------------------------------------
# Texture tiles.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tiles() -> dict[str, np.ndarray]:
    """Fixed periodic noise tiles (flattened), shared by all sites: textures come from them."""
    rng = np.random.default_rng(20160525)
    fy = np.fft.fftfreq(_TILE)[:, None]
    fx = np.fft.fftfreq(_TILE)[None, :]

    def smooth(sigma_x, sigma_y):  # Gaussian-filtered white noise, zero mean, unit variance.
        noise = np.fft.fft2(rng.standard_normal((_TILE, _TILE)))
        kernel = np.exp(-2 * np.pi**2 * ((sigma_x * fx) ** 2 + (sigma_y * fy) ** 2))
        field = np.real(np.fft.ifft2(noise * kernel))
        return (field - field.mean()) / field.std()

    def unit_mean(field):
        return field / field.mean()

    fine = smooth(0.7, 0.7) - 0.6 * smooth(2.0, 2.0)
    tiles = {
        # Zero mean, unit variance.
        "fine": (fine - fine.mean()) / fine.std(),
        "blob": smooth(1.5, 1.5),
        "foci": smooth(0.9, 0.9),
        "coarse": smooth(5.0, 5.0),
        # Non-negative, unit mean. Zero crossings of smooth noise make a reticular network.
        "reticulum": unit_mean(np.exp(-((smooth(3.0, 3.0) / 0.3) ** 2))),
        "tubules": unit_mean(np.exp(-((smooth(1.8, 1.8) / 0.25) ** 2))),
        "puncta": unit_mean(np.clip(smooth(1.2, 1.2) - 1.2, 0, None)),
        "aggregates": unit_mean(np.clip(smooth(1.6, 1.6) - 1.6, 0, None)),
        # Elongated along x (tile columns): fibres when x follows a cell axis or the radius.
        "fibres": unit_mean(np.clip(smooth(16.0, 0.8) - 0.7, 0, None)),
        "microtubules": unit_mean(np.clip(smooth(24.0, 0.7), 0, None)),
        "bundles": unit_mean(np.clip(smooth(16.0, 1.8) - 0.6, 0, None) ** 1.5),
    }
    return {k: np.ascontiguousarray(t, np.float32).ravel() for k, t in tiles.items()}


# Fixed stream per texture use, so that draws do not depend on which channels are rendered.
_TEXTURE_USES = (
    "irregular", "chromatin", "nucleoli", "foci", "golgi", "rna", "reticulum", "tubules",
    "puncta", "aggregates", "fibres", "microtubules", "bundles", "wave",
)


class _Textures:
    """Samples texture tiles at per-pixel integer tile coordinates plus per-cell random offsets."""

    def __init__(self, seed, n):
        self.seed = seed
        self.n = n

    def sample(self, tile, use, u, v, cell):
        """tile[v + ov, u + ou] (periodic); u, v int32 per pixel, `cell` the pixel's cell."""
        rng = np.random.default_rng([self.seed, 1, _TEXTURE_USES.index(use)])
        ou, ov = rng.integers(0, _TILE, (2, self.n), dtype=np.int32)
        index = (((v + ov[cell]) & _MASK) << 8) | ((u + ou[cell]) & _MASK)
        return _tiles()[tile].take(index)


def _tile_coords(dx, dy, cos, sin, scale):
    """Integer tile coordinates of pixels in each cell's frame (u along its long axis)."""
    u = (cos * dx + sin * dy) * scale + _POSITIVE
    v = (cos * dy - sin * dx) * scale + _POSITIVE
    return u.astype(np.int32), v.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _disc(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer (dy, dx) offsets of the pixels within `radius` of a centre pixel."""
    dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    inside = dx * dx + dy * dy <= (radius + 0.5) ** 2
    return dy[inside].astype(np.int32), dx[inside].astype(np.int32)


def _draw_cells(signal, phenotypes, centres, structures, cell_scale, seed):
    """Adds all cells' structures (relative intensity, 1 = bright) into signal (C, H, W).

    Works on one flat list of pixels: each cell's disc of radius `extent`, cut to the canvas.
    Per-cell parameters are gathered per pixel (`at`), fields are 1-D over all pixels.
    """
    n = len(phenotypes)
    height, width = signal.shape[1:]
    f32 = np.float32
    g = _geometry(phenotypes, cell_scale, np.random.default_rng([seed, 2]))
    v, mitotic = g["v"], g["mitotic"]
    tex = _Textures(seed, n)

    ix = np.rint(centres[:, 0]).astype(np.int32)
    iy = np.rint(centres[:, 1]).astype(np.int32)
    discs = [_disc(int(r)) for r in np.ceil(g["extent"]) + 1]
    cell = np.repeat(np.arange(n), [len(d[0]) for d in discs])
    py = np.concatenate([d[0] for d in discs]) + iy[cell]
    px = np.concatenate([d[1] for d in discs]) + ix[cell]
    keep = np.flatnonzero((px >= 0) & (px < width) & (py >= 0) & (py < height))
    cell, py, px = cell[keep], py[keep], px[keep]
    flat = py.astype(np.intp) * width + px
    dx = (px - centres[cell, 0]).astype(f32)  # Offsets from the nucleus centre.
    dy = (py - centres[cell, 1]).astype(f32)

    def at(x):  # Per-cell values -> per-pixel (float32).
        return np.asarray(x, f32)[cell]

    cos, sin = at(np.cos(g["angle"])), at(np.sin(g["angle"]))
    u, w = _tile_coords(dx, dy, cos, sin, f32(1.0 / cell_scale))

    # Nuclear region: the pixels within reach of the nuclei and the Golgi.
    near = np.flatnonzero(dx * dx + dy * dy <= at(g["nuclear_extent"]) ** 2)
    ncell, dxn, dyn, un, wn = cell[near], dx[near], dy[near], u[near], w[near]

    def full(x):  # Nuclear-region field -> all pixels.
        out = np.zeros(len(cell), f32)
        out[near] = x
        return out

    amount = np.asarray(0.04 + 0.06 * np.clip(v["nuclear_fragmentation"], 0, 2), f32)[ncell]
    irregular = 1.0 + amount * tex.sample("coarse", "irregular", un, wn, ncell)
    nuc = np.zeros(len(near), f32)
    dna = np.zeros(len(near), f32)
    obj, valid = g["objects"], g["valid"]
    for j in range(valid.shape[1]):
        sel = np.flatnonzero(valid[ncell, j])
        if sel.size == 0:
            continue
        o = {k: np.asarray(a[:, j], f32)[ncell[sel]] for k, a in obj.items()}
        ox, oy = dxn[sel] - o["x"], dyn[sel] - o["y"]
        c, s = np.cos(o["angle"]), np.sin(o["angle"])
        d2 = ((c * ox + s * oy) / o["a"]) ** 2 + ((c * oy - s * ox) / o["b"]) ** 2
        profile = _smoothstep((1.0 - d2 * irregular[sel]) / 0.35)
        nuc[sel] = np.maximum(nuc[sel], profile)
        dna[sel] = np.maximum(dna[sel], profile * o["bright"])
    core = _smoothstep((nuc - 0.5) / 0.5)  # Nuclear interior, away from the envelope.

    needs = set(structures)
    if needs & {"nucleus", "rna"}:
        level = np.clip(v["nucleoli"], -3, 3)
        scale = np.asarray(np.exp(-0.25 * level) / cell_scale, f32)[ncell]  # Bigger: coarser.
        ul, wl = _tile_coords(dxn, dyn, cos[near], sin[near], scale)
        blob = tex.sample("blob", "nucleoli", ul, wl, ncell)
        threshold = np.asarray(1.3 - 0.35 * level, f32)[ncell]
        nucleoli = core * np.clip(blob - threshold, 0.0, 1.0) * np.asarray(1 - mitotic, f32)[ncell]
    if "gh2ax" in needs:
        spots = tex.sample("foci", "foci", un, wn, ncell)
        threshold = np.asarray(2.2 - 0.55 * v["dna_damage_foci"], f32)[ncell]
        foci = core * _smoothstep((spots - threshold) / 0.25)  # Bright, discrete foci.
    if needs & {"agp", "membrane"}:
        gx = dxn - np.asarray(g["golgi_x"], f32)[ncell]
        gy = dyn - np.asarray(g["golgi_y"], f32)[ncell]
        spread = np.asarray(2.0 * g["golgi_sigma"] ** 2, f32)[ncell]
        stacks = np.clip(0.4 + 0.6 * tex.sample("blob", "golgi", un, wn, ncell), 0.0, None)
        dim = np.asarray(np.exp(-0.35 * np.maximum(g["dispersal"], 0.0)), f32)[ncell]
        golgi = np.exp(-(gx * gx + gy * gy) / spread) * stacks * (1.0 - nuc) * dim

    # Cell bodies, then ownership: each pixel goes to the cell it lies deepest inside (smallest
    # radius-normalised distance), so neighbours meet at borders instead of overlapping.
    bx, by = dx - at(g["body_x"]), dy - at(g["body_y"])
    rho = np.sqrt(bx * bx + by * by)
    theta = np.arctan2(by, bx)
    radius = np.ones(len(cell), f32)
    for k, harmonic in enumerate(_HARMONICS):
        radius += at(g["amps"][:, k]) * np.cos(harmonic * theta - at(g["phases"][:, k]))
    dc = rho / (radius * at(g["cell_radius"]))
    depth = np.full(height * width, np.inf, f32)
    bounds = np.searchsorted(cell, np.arange(n + 1))  # Pixels are grouped by cell.
    for a, b in zip(bounds[:-1], bounds[1:]):  # Faster than np.minimum.at; unique within a cell.
        depth[flat[a:b]] = np.minimum(depth[flat[a:b]], dc[a:b])
    own = dc <= depth[flat]
    body = own * _smoothstep((1.0 - dc) / 0.1)
    ring = own * np.clip(1.0 - np.abs(dc - 0.93) / 0.07, 0.0, 1.0)  # Cortex / plasma membrane.
    inner = np.clip(1.1 - dc, 0.0, 1.0)  # Perinuclear > peripheral.
    cyto = body * (1.0 - full(nuc))

    def intensity(name):
        return at(np.exp(0.4 * v[name]))

    cache = {}

    def actin():
        if "actin" not in cache:
            dis = v["actin_disruption"]
            fibre_w = at(np.clip(1.0 - 0.5 * dis, 0.0, 2.0) * (1.0 - mitotic))
            aggregate_w = at(np.clip(0.6 * dis, 0.0, 2.5))
            cortex_w = at(np.clip(1.0 - 0.2 * dis, 0.3, 1.5) * (1.0 + 0.8 * mitotic))
            fibres = tex.sample("fibres", "fibres", u, w, cell)
            aggregates = tex.sample("aggregates", "aggregates", u, w, cell)
            cache["actin"] = intensity("actin_intensity") * (
                0.9 * cortex_w * ring
                + body * (0.15 + 0.3 * fibre_w * fibres + 0.35 * aggregate_w * aggregates)
            )
        return cache["actin"]

    def membrane(ring_weight, golgi_weight):
        return intensity("membrane_intensity") * (
            ring_weight * ring + (0.1 + golgi_weight * full(golgi)) * body
        )

    for c, structure in enumerate(structures):
        if structure == "nucleus":
            chromatin = 1.0 + np.asarray(0.12 + 0.15 * mitotic, f32)[ncell] * tex.sample(
                "fine", "chromatin", un, wn, ncell
            )
            holes = 1.0 - 0.5 * np.clip(2.0 * nucleoli, 0.0, 1.0)
            image = intensity("dna_intensity") * full(0.85 * dna * chromatin * holes)
        elif structure == "rna":
            bright = np.asarray(1.2 * np.exp(0.3 * np.clip(v["nucleoli"], -3, 3)), f32)[ncell]
            fine = tex.sample("fine", "rna", u, w, cell)
            cytoplasm = cyto * (0.2 + 0.25 * inner) * np.clip(1.0 + 0.3 * fine, 0.0, None)
            image = intensity("rna_intensity") * (full(0.2 * nuc + bright * nucleoli) + cytoplasm)
        elif structure == "er":
            weight = at(np.clip(0.5 + 0.25 * v["er_texture"], 0.0, 1.0))
            pattern = (1.0 - weight) + weight * tex.sample("reticulum", "reticulum", u, w, cell)
            envelope = full(1.4 * nuc * (1.0 - nuc))
            image = intensity("er_intensity") * (cyto * (0.15 + 0.45 * inner) * pattern + envelope)
        elif structure == "mito":
            weight = at(np.clip(0.3 + 0.4 * v["mito_puncta"], 0.0, 1.0))
            tubules = tex.sample("tubules", "tubules", u, w, cell)
            puncta = tex.sample("puncta", "puncta", u, w, cell)
            pattern = 0.15 + (1.0 - weight) * tubules + weight * puncta
            image = intensity("mito_intensity") * cyto * (0.1 + 0.5 * inner**1.5) * pattern
        elif structure == "tubulin":
            # Polar tile coordinates: x = radius, y = angle (one turn spans the tile exactly
            # once, so the pattern is continuous across theta = +-pi): radial microtubules.
            # Slow noise on the angle makes the microtubules curve.
            wave = tex.sample("coarse", "wave", u, w, cell)
            ang = (theta * f32(_TILE / (2 * np.pi)) + 4.0 * wave + _POSITIVE).astype(np.int32)
            rad = (rho * f32(1.0 / cell_scale) + _POSITIVE).astype(np.int32)
            level = v["tubulin_bundling"]
            contrast = at(np.clip(0.5 + 0.2 * level, 0.0, 1.0) * (1.0 - mitotic))
            bundle_w = at(np.clip(0.5 * level, 0.0, 2.0) * (1.0 - mitotic))
            network = (
                (1.0 - contrast)
                + contrast * tex.sample("microtubules", "microtubules", rad, ang, cell)
                + bundle_w * tex.sample("bundles", "bundles", rad, ang, cell)
            )
            # Mitotic cells: a bright round spindle; microtubules run around the nucleus.
            bright = at(1.0 + 1.0 * mitotic) * (1.0 - 0.4 * full(nuc))
            image = intensity("tubulin_intensity") * body * (0.15 + 0.35 * inner) * network
            image *= bright
        elif structure == "actin":
            image = actin()
        elif structure == "agp":
            image = 0.7 * actin() + membrane(0.5, 0.9)
        elif structure == "membrane":
            image = membrane(0.8, 1.0)
        elif structure == "gh2ax":
            pan = np.asarray(0.1 * np.exp(0.3 * v["dna_damage_foci"]), f32)[ncell] * nuc
            image = full(pan + foci)
        else:  # pragma: no cover - CHANNEL_STRUCTURES and this dispatch are kept in sync.
            raise AssertionError(structure)
        drawn = np.bincount(flat, weights=image, minlength=height * width)
        signal[c] += drawn.reshape(height, width).astype(f32)


# ---------------------------------------------------------------------------------------------
# Image formation.
# ---------------------------------------------------------------------------------------------


def _form_image(signal, channels, technical, reach, seed) -> np.ndarray:
    """Blur, illumination x gain, offset, Poisson photon noise + Gaussian read noise, 16 bit.

    Photon noise is Poisson; where the mean exceeds 50 photons its normal approximation
    (skewness < 0.15) is used with the read noise in one draw, an order of magnitude cheaper.
    """
    num_channels = signal.shape[0]
    height, width = signal.shape[1] - 2 * reach, signal.shape[2] - 2 * reach
    f32 = np.float32
    field = SIGNAL_SCALE * illumination_field(technical, (height, width)).astype(f32)
    photon_scale, read_var = f32(technical.photon_scale), f32(technical.read_noise**2)
    images = np.empty((num_channels, height, width), np.uint16)
    for c in range(num_channels):
        # Noise keyed by the channel's name: a channel's pixels do not depend on the others.
        rng = np.random.default_rng([seed, 3, zlib.crc32(channels[c].encode())])
        light = signal[c]
        if technical.blur_sigma > 0:
            light = ndimage.gaussian_filter(light, technical.blur_sigma, mode="constant")
        light = light[reach : reach + height, reach : reach + width]
        mean = (light + f32(MEDIUM_BACKGROUND)) * (field * f32(technical.gain[c]))
        mean = np.maximum(mean + f32(technical.offset[c]), 0.0)
        z = rng.standard_normal((height, width), f32)
        counts = mean + np.sqrt(mean / photon_scale + read_var) * z
        dim = np.flatnonzero(mean < 50.0 / photon_scale)
        if dim.size:
            photons = rng.poisson(mean.ravel()[dim] * photon_scale)
            counts.ravel()[dim] = photons / photon_scale + np.sqrt(read_var) * z.ravel()[dim]
        images[c] = np.clip(np.rint(counts), 0, MAX_COUNT)
    return images
