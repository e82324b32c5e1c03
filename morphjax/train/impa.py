"""IMPA and GRAPE training: a StarGAN-v2-style objective over a built screen (impa.txt, Methods).

Per step, one discriminator update then one joint update of generator G, style encoder E and
condition encoder f (the reference solver's order):
  D:  L_D = BCE(D_y(x_real), 1) + BCE(D_y'(G(x, s)), 0) + r1 * 0.5 E||d D_y(x_real) / d x||^2
  G:  L_G = BCE(D_y'(G(x, s)), 1) + sty |E(G(x, s)) - s| - ds(t) |G(x, s1) - G(x, s2)|
            + cyc |G(G(x, s), E(x)) - x|,      s = f([e_y' ; z])
with the diversity weight ds(t) decayed linearly to 0 (eqs. 3-7, 11). GRAPE (grape.txt 3.3-3.5):
no noise and no diversity term, and the style loss |E(sg G(x, s)) - sg s| trains E only.

Modes (config.data.mode):
- perturbation: x is a control cell, the target y' is the perturbation of a treated cell drawn
  uniformly from all treated cells (or uniformly over perturbations), and that treated cell is the
  real image (reference pairing). Held-out perturbations are absent from training and are
  predicted from their embeddings.
- multimodal: the same with one condition encoder and one discriminator head per modality
  (compound, CRISPR, ORF, ...), all in one style space. Any control is paired with any treated
  cell (the reference pairs within a modality's plates).
- batch_correction / transfer: every cell is an input; real = the input with its own domain
  (`data.domain`: batch for batch correction, perturbation for GRAPE); y' is uniform over the
  other domains seen in training; the domain table is learned.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from flax import nnx

from morphjax import data
from morphjax.data import conditions
from morphjax.models import impa as impa_models
from morphjax.models.conditioning import PerturbationConditioner
from morphjax.train.optim import make_optimizer
from morphjax.train.state import TrainState

MODES = ("perturbation", "multimodal", "batch_correction", "transfer")
PAIRED_MODES = ("perturbation", "multimodal")


# -- losses (pure; tests re-derive them) ---------------------------------------------------------

def bce_with_logits(logits: jax.Array, target: float) -> jax.Array:
    """Mean binary cross-entropy of logits against a constant 0/1 target."""
    return optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)).mean()


def r1_penalty(critic, x: jax.Array) -> jax.Array:
    """0.5 * mean over the batch of ||d critic(x)_b / d x_b||^2 (StarGAN-v2 R1, eq. 11)."""
    grads = jax.grad(lambda v: critic(v).sum())(x)
    return 0.5 * jnp.square(grads).reshape(x.shape[0], -1).sum(-1).mean()


def diversity_weight(weight: float, decay_steps: int, step: jax.Array) -> jax.Array:
    """Linear decay of the diversity-sensitive loss weight to 0 over `decay_steps` (eq. 7)."""
    return weight * jnp.maximum(0.0, 1.0 - step.astype(jnp.float32) / decay_steps)


# -- data ----------------------------------------------------------------------------------------

def prepare_image(image: np.ndarray, image_size: int, rng: np.random.Generator | None, *,
                  dequantize: bool, flip_prob: float) -> np.ndarray:
    """uint8 HWC crop -> float32 in [-1, 1] at `image_size` (IMPA's CustomTransform).

    Training (`rng` given): x = (x + U[0, 1)) / 255 and independent horizontal/vertical flips with
    probability `flip_prob`. Evaluation: x = (x + 0.5) / 255, the expectation of the same.
    Larger crops are area-downsampled by their integer ratio to `image_size`.
    """
    x = image.astype(np.float32)
    if rng is not None and dequantize:
        x = x + rng.random(x.shape, dtype=np.float32)
    else:
        x = x + (0.5 if dequantize else 0.0)
    x = x / 255.0
    factor = x.shape[0] // image_size
    if factor > 1:
        h, w, c = x.shape
        x = x.reshape(h // factor, factor, w // factor, factor, c).mean(axis=(1, 3))
    x = x * 2.0 - 1.0
    if rng is not None:
        if rng.random() < flip_prob:
            x = x[:, ::-1]
        if rng.random() < flip_prob:
            x = x[::-1]
    return np.ascontiguousarray(x)


def to_uint8(images: np.ndarray | jax.Array) -> np.ndarray:
    """Model-space [-1, 1] images back to uint8 (clipped)."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class ScreenSpec:
    """What the task knows about the dataset: tables, id maps and condition embeddings."""

    dataset_dir: str
    channels: tuple[str, ...]
    cells: pd.DataFrame  # cells.csv
    perturbations: pd.DataFrame  # perturbations.csv
    seen: np.ndarray  # perturbation ids that are training targets
    unseen: np.ndarray  # treated perturbation ids without training cells (predicted)
    modalities: tuple[str, ...]
    head_of: np.ndarray  # perturbation id -> discriminator head
    domain_of: np.ndarray  # perturbation id (paired) or domain value (transfer) -> D column
    num_domains: int
    tables: dict[str, np.ndarray]


def seen_and_unseen(cells: pd.DataFrame, names: pd.Series, is_control: np.ndarray,
                    d: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """Treated perturbation ids (among `d.perturbations`, all if empty) that training sees, and
    the unseen ones: held out by `d.holdout` or without cells in `d.train_split`."""
    train_counts = np.bincount(cells.loc[cells["split"] == d.train_split, "perturbation_id"],
                               minlength=len(names))
    wanted = (names.isin(d.perturbations).to_numpy() if d.perturbations
              else np.ones(len(names), bool))
    held = names.isin(d.holdout).to_numpy()
    treated = ~is_control & wanted
    seen = np.flatnonzero(treated & ~held & (train_counts > 0))
    unseen = np.flatnonzero(treated & (held | (train_counts == 0)))
    return seen, unseen


def read_dataset_report(path: str, image_size: int, *, example_preset: str) -> dict:
    """The build report of the dataset at `data.path`, checked to exist and to fit `image_size`."""
    from data_builders.raw_screen import read_build_report  # noqa: PLC0415

    if not path:
        raise ValueError("data.path is empty: set it to a dataset built by `morphjax build`, e.g. "
                         f"--set data.path=runs/data/{example_preset}_small/dataset")
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"data.path {path} does not exist; build it first, e.g. `morphjax build "
            f"synthetic_screen --preset {example_preset} --scale small --out "
            f"{os.path.dirname(os.path.abspath(path))}`")
    report = read_build_report(path)
    crop = int(report["options"].get("resize_to") or report["options"]["crop_size"])
    if crop % image_size:
        raise ValueError(f"data.image_size {image_size} does not divide the dataset's {crop} px "
                         f"crops; set data.image_size to {crop} or a divisor, or rebuild with --resize")
    return report


def load_screen(config: ml_collections.ConfigDict, cache_dir: str | None = None) -> ScreenSpec:
    """Reads a built screen and derives targets, heads and condition tables from `config.data`."""
    from data_builders.raw_screen import read_tables  # noqa: PLC0415

    d = config.data
    if d.mode not in MODES:
        raise ValueError(f"data.mode {d.mode!r} is not one of {MODES}")
    report = read_dataset_report(d.path, d.image_size, example_preset="bbbc021_like")
    tables = read_tables(d.path)
    cells, perts = tables["cells"], tables["perturbations"]
    names = perts["perturbation"].astype(str)
    _check_names(d.perturbations, names, "data.perturbations")
    _check_names(d.holdout, names, "data.holdout")
    is_control = perts["is_control"].astype(int).to_numpy().astype(bool)
    seen, unseen = seen_and_unseen(cells, names, is_control, d)
    modality_names = conditions.perturbation_modalities(perts)
    modalities = tuple(dict.fromkeys(modality_names[i] for i in seen))

    if d.mode in PAIRED_MODES:
        if not seen.size:
            raise ValueError(f"{d.path}: no treated perturbation has training cells")
        if d.mode == "perturbation" and len(modalities) > 1:
            raise ValueError(f"the dataset's perturbations span modalities {list(modalities)}; use "
                             "data.mode=multimodal or restrict data.perturbations")
        head_of = np.array([modalities.index(m) if m in modalities else 0 for m in modality_names])
        domain_of = np.full(len(perts), -1, np.int32)
        for head in range(len(modalities)):
            members = seen[head_of[seen] == head]
            domain_of[members] = np.arange(members.size)
        num_domains = int(max(np.sum(head_of[seen] == h) for h in range(len(modalities))))
        tables_ = {} if config.model.learned_embedding_dim else conditions.perturbation_embeddings(
            d.path, perts, morgan_bits=d.morgan_bits, morgan_radius=d.morgan_radius,
            gene_embeddings=d.gene_embeddings, sequence_kmer=d.sequence_kmer, cache_dir=cache_dir)
        tables_ = {m: tables_[m] for m in modalities} if tables_ else {}
    else:
        if d.domain not in cells.columns:
            raise ValueError(f"data.domain {d.domain!r} is not a column of {d.path}/cells.csv")
        num_domains = int(cells[d.domain].max()) + 1
        head_of = np.zeros(num_domains, np.int32)
        domain_of = np.arange(num_domains, dtype=np.int32)
        if not config.model.learned_embedding_dim:
            raise ValueError(f"data.mode {d.mode!r} learns its domain table: set "
                             "model.learned_embedding_dim (IMPA batch correction: 100; GRAPE: 500)")
        tables_ = {}
        modalities = ("learned",)
    return ScreenSpec(
        dataset_dir=d.path, channels=tuple(report["channels"]), cells=cells,
        perturbations=perts, seen=seen, unseen=unseen, modalities=modalities, head_of=head_of,
        domain_of=domain_of, num_domains=num_domains, tables=tables_)


def fingerprint_cache() -> str:
    """$MORPHJAX_CACHE/fingerprints (default ~/.cache/morphjax/fingerprints)."""
    root = os.environ.get("MORPHJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                         "morphjax"))
    return os.path.join(root, "fingerprints")


def _check_names(requested, names: pd.Series, field: str) -> None:
    missing = [n for n in requested if n not in set(names)]
    if missing:
        raise ValueError(f"{field} names perturbations not in the dataset: {missing}")


def split_cells(spec: ScreenSpec, split: str) -> pd.DataFrame:
    """Rows of cells.csv of `split`, in example order."""
    rows = spec.cells[spec.cells["split"] == split].sort_values("split_index")
    if not np.array_equal(rows["split_index"].to_numpy(), np.arange(len(rows))):
        raise ValueError(f"{spec.dataset_dir}/cells.csv: split_index of {split!r} is not 0..n-1")
    return rows


# -- the task ------------------------------------------------------------------------------------

class ImpaTask:
    """IMPA / GRAPE on a built screen; models: generator, style_encoder, discriminator, mapping."""

    sample_columns = 8

    def __init__(self, config: ml_collections.ConfigDict, spec: ScreenSpec | None = None):
        self.config = config
        if config.train.grad_accum_steps != 1:
            raise ValueError("train.grad_accum_steps must be 1 for IMPA: the discriminator and "
                             "generator updates alternate every step")
        self.spec = load_screen(config, cache_dir=fingerprint_cache()) if spec is None else spec
        s = self.spec
        self.paired = config.data.mode in PAIRED_MODES
        self.channels = len(s.channels)
        self._seen = jnp.asarray(s.seen if self.paired else self._train_domains(), jnp.int32)
        self._head_of = jnp.asarray(s.head_of, jnp.int32)
        self._domain_of = jnp.asarray(s.domain_of, jnp.int32)
        self._sources = {}

    def _train_domains(self) -> np.ndarray:
        rows = split_cells(self.spec, self.config.data.train_split)
        return np.unique(rows[self.config.data.domain].to_numpy())

    # -- data ------------------------------------------------------------------------------------
    def source(self, split: str):
        """Random-access examples of `split`, opened once per task."""
        from data_builders.raw_screen import open_split  # noqa: PLC0415

        if split not in self._sources:
            self._sources[split] = open_split(self.spec.dataset_dir, split)
        return self._sources[split]

    def _train_rows(self) -> pd.DataFrame:
        rows = split_cells(self.spec, self.config.data.train_split)
        if not self.paired:
            return rows
        return rows[rows["is_control"].astype(bool) | rows["perturbation_id"].isin(self.spec.seen)]

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        d, t = self.config.data, self.config.train
        rows = self._train_rows()
        source = grain.MapDataset.source(data.Subset(self.source(d.train_split),
                                                 rows["split_index"].to_numpy()))
        options = dict(dequantize=d.dequantize, flip_prob=d.flip_prob)
        size = d.image_size
        if self.paired:
            pairs = data.control_treated_pairs(
                source, rows["is_control"].to_numpy().astype(bool),
                rows["perturbation_id"].to_numpy(), seed=self.config.seed,
                balance_perturbations=d.balance_perturbations)

            def transform(item, rng):
                return {"control": prepare_image(item["control"]["image"], size, rng, **options),
                        "treated": prepare_image(item["treated"]["image"], size, rng, **options),
                        "perturbation_id": np.int32(item["treated"]["perturbation_id"])}

            return data.make_train_dataset(
                pairs, batch_size=t.batch_size // process_count, seed=self.config.seed,
                transform=transform, process_index=process_index, process_count=process_count,
                num_workers=d.num_workers)

        domain = d.domain

        def transform(item, rng):
            return {"image": prepare_image(item["image"], size, rng, **options),
                    "domain": np.int32(item[domain])}

        return data.make_train_dataset(
            source, batch_size=t.batch_size // process_count, seed=self.config.seed,
            transform=transform, labels=rows[domain].to_numpy(),
            balance_classes=d.balance_perturbations, process_index=process_index,
            process_count=process_count, num_workers=d.num_workers)

    def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset | None:
        d = self.config.data
        rows = split_cells(self.spec, d.eval_split)
        if self.paired:
            rows = rows[rows["is_control"].astype(bool)]
        if not len(rows):
            return None
        source = data.Subset(self.source(d.eval_split), rows["split_index"].to_numpy())
        size, dequantize, domain = d.image_size, d.dequantize, d.domain

        def transform(item):
            out = {"image": prepare_image(item["image"], size, None, dequantize=dequantize,
                                          flip_prob=0.0)}
            if not self.paired:
                out["domain"] = np.int32(item[domain])
            return out

        return data.make_eval_dataset(
            source, batch_size=self.config.train.batch_size // process_count,
            transform=transform, process_index=process_index, process_count=process_count)

    # -- models ----------------------------------------------------------------------------------
    def build_models(self, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
        c, m, s = self.config, self.config.model, self.spec
        dtype = jnp.dtype(c.compute_dtype)
        size, channels = c.data.image_size, self.channels
        common = dict(img_size=size, in_channels=channels, dim_in=m.dim_in,
                      max_conv_dim=m.max_conv_dim, dtype=dtype, rngs=rngs)
        generator = impa_models.Generator(style_dim=m.style_dim, **common)
        style_encoder = impa_models.StyleEncoder(style_dim=m.style_dim, **common)
        discriminator = impa_models.Discriminator(num_domains=s.num_domains,
                                                  num_heads=len(s.modalities), **common)
        if self.paired:
            modality_of = s.head_of
        else:
            modality_of = np.zeros(s.num_domains, np.int32)
        mapping = PerturbationConditioner(
            modality_of, tables=s.tables or None, learned_dim=m.learned_embedding_dim,
            noise_dim=m.noise_dim, style_dim=m.style_dim, num_layers=m.mapping_layers,
            hidden_dim=m.mapping_hidden, rngs=rngs)
        return {"generator": generator, "style_encoder": style_encoder,
                "discriminator": discriminator, "mapping": mapping}

    def build(self, rngs: nnx.Rngs) -> TrainState:
        models = self.build_models(rngs)
        c = self.config
        optimizers = {name: nnx.Optimizer(model, make_optimizer(c.optimizer, c.train.total_steps),
                                          wrt=nnx.Param)
                      for name, model in models.items()}
        return TrainState(models, optimizers, ema_decay=c.train.ema_decay)

    # -- step ------------------------------------------------------------------------------------
    def noise(self, rng: jax.Array, n: int) -> jax.Array | None:
        k = self.config.model.noise_dim
        return jax.random.normal(rng, (n, k)) if k else None

    def _targets(self, batch, rng):
        """(source, real, real domain/head, target ids, target domain/head) for one batch."""
        if self.paired:
            ids = batch["perturbation_id"]
            dom, head = self._domain_of[ids], self._head_of[ids]
            return batch["control"], batch["treated"], dom, head, ids, dom, head
        y = batch["domain"]
        n = self._seen.shape[0]
        position = jnp.argmax(self._seen[None, :] == y[:, None], axis=1)
        shift = jax.random.randint(rng, y.shape, 1, max(n, 2))
        target = self._seen[(position + shift) % n]
        zeros = jnp.zeros_like(y)
        return batch["image"], batch["image"], y, zeros, target, target, zeros

    def train_step(self, state: TrainState, batch: dict[str, jax.Array], rng: jax.Array):
        w = self.config.loss
        G, E = state.models["generator"], state.models["style_encoder"]
        D, F = state.models["discriminator"], state.models["mapping"]
        k_target, k_z1, k_z2 = jax.random.split(rng, 3)
        x, real, real_dom, real_head, ids, dom, head = self._targets(batch, k_target)
        z1, z2 = self.noise(k_z1, x.shape[0]), self.noise(k_z2, x.shape[0])

        fake = jax.lax.stop_gradient(G(x, F(ids, z1))[1])

        def d_loss(D):
            loss_real = bce_with_logits(D(real, real_dom, real_head), 1.0)
            r1 = r1_penalty(lambda v: D(v, real_dom, real_head), real)
            loss_fake = bce_with_logits(D(fake, dom, head), 0.0)
            return loss_real + loss_fake + w.r1 * r1, dict(d_real=loss_real, d_fake=loss_fake,
                                                           r1=r1)

        (loss_d, aux_d), grads_d = nnx.value_and_grad(d_loss, has_aux=True)(D)
        state.optimizers["discriminator"].update(D, grads_d)

        lambda_ds = diversity_weight(w.diversity, w.ds_decay_steps, state.step.get_value())
        use_diversity = z1 is not None and w.diversity > 0

        def g_loss(G, E, F):
            s1 = F(ids, z1)
            fake = G(x, s1)[1]
            adv = bce_with_logits(D(fake, dom, head), 1.0)
            if w.detach_style:  # GRAPE: trains the style encoder only.
                sty = jnp.abs(E(jax.lax.stop_gradient(fake)) - jax.lax.stop_gradient(s1)).mean()
            else:
                sty = jnp.abs(E(fake) - s1).mean()
            ds = jnp.zeros(())
            if use_diversity:
                fake2 = jax.lax.stop_gradient(G(x, F(ids, z2))[1])
                ds = jnp.abs(fake - fake2).mean()
            cyc = jnp.abs(G(fake, E(x))[1] - x).mean()
            total = w.adversarial * adv + w.style * sty - lambda_ds * ds + w.cycle * cyc
            return total, dict(g_adv=adv, style=sty, diversity=ds, cycle=cyc)

        (loss_g, aux_g), grads = nnx.value_and_grad(g_loss, argnums=(0, 1, 2), has_aux=True)(G, E, F)
        for name, model, grad in zip(("generator", "style_encoder", "mapping"), (G, E, F), grads):
            state.optimizers[name].update(model, grad)
        return {"loss": loss_g + loss_d, "loss_d": loss_d, "loss_g": loss_g, **aux_d, **aux_g,
                "lambda_ds": lambda_ds}

    # -- evaluation and samples --------------------------------------------------------------------
    def transfer(self, state: TrainState, images: jax.Array, ids: jax.Array,
                 noise: jax.Array | None) -> jax.Array:
        """G(x, f(e_ids, z)) with the evaluation (EMA if kept) models."""
        G, F = state.eval_model("generator"), state.eval_model("mapping")
        return G(images, F(ids, noise))[1]

    def eval_step(self, state: TrainState, batch: dict[str, jax.Array]):
        E, G = state.eval_model("style_encoder"), state.eval_model("generator")
        F = state.eval_model("mapping")
        x = batch["image"]
        n = self._seen.shape[0]
        ids = self._seen[jnp.arange(x.shape[0]) % n]
        style = F(ids, self.noise(jax.random.key(0), x.shape[0]))
        fake = G(x, style)[1]
        valid = batch["valid"].astype(jnp.float32)
        style_l1 = jnp.abs(E(fake) - style).mean(-1)
        cycle_l1 = jnp.abs(G(fake, E(x))[1] - x).mean((1, 2, 3))
        changed = jnp.abs(fake - x).mean((1, 2, 3))
        return {"style_l1": (style_l1 * valid).sum(), "cycle_l1": (cycle_l1 * valid).sum(),
                "change_l1": (changed * valid).sum(), "count": valid.sum()}

    def samples(self, state: TrainState, batch: dict[str, Any]):
        x, real, _, _, ids, _, _ = self._targets(batch, jax.random.key(1))
        n = min(self.sample_columns, x.shape[0])
        fake = self.transfer(state, x[:n], ids[:n], self.noise(jax.random.key(2), n))
        return {"control_generated_real": jnp.concatenate([x[:n], fake, real[:n]])}
