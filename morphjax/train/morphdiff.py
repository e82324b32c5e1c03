"""MorphDiff training: the KL autoencoder, then latent diffusion on its frozen latents.

morphdiff.txt (Methods, "MorphDiff Model") and the reference code (notes sections 1-2):

Stage 1, `MorphDiffAutoencoderTask` (taming `LPIPSWithDiscriminator`), per step:
  AE:  L = sum|x - x'| / B + perceptual + kl_weight KL + w_adapt * f(step) * (-mean D(x'))
       w_adapt = disc_weight * clip(||dNLL/dW_last|| / (||dG/dW_last|| + 1e-4), 0, 1e4)
  D:   L_D = f(step) * 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(sg x')))
with f(step) = 0 before `loss.disc_start`. The discriminator sees the reconstruction of the same
step (the reference re-encodes the batch for its D step; the difference is one optimizer step).

Stage 2, `MorphDiffLdmTask`: the training crops are encoded once by the frozen autoencoder and
cached as posterior moments in ArrayRecord; every step samples z ~ N(mean, var) from the cache
(the reference re-encodes and samples every step: the same distribution, without the encoder
cost), scales it by 1 / std(z) and trains the U-Net on eps with an L1 loss, conditioned on the
context tokens of the cell's perturbation's L1000 vector.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from flax import nnx

from morphjax import data
from morphjax import diffusion
from morphjax.models import autoencoder as ae_lib
from morphjax.models.conditioning import ExpressionContext
from morphjax.models.unet import UNet
from morphjax.train import grads as grads_lib
from morphjax.train.impa import prepare_image, read_dataset_report, seen_and_unseen
from morphjax.train.optim import make_optimizer
from morphjax.train.state import FrozenParam, TrainState


# -- data ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ExpressionScreen:
    """A built screen with one L1000 vector per perturbation, and its seen/unseen split."""

    dataset_dir: str
    channels: tuple[str, ...]  # Channels the models see, in order.
    channel_index: np.ndarray  # Positions of `channels` in the dataset's crops.
    crop_size: int
    cells: pd.DataFrame
    perturbations: pd.DataFrame
    expression: np.ndarray | None  # (P, G) float32, row i = perturbation id i.
    is_control: np.ndarray  # (P,) bool
    seen: np.ndarray  # Treated perturbation ids with training cells (trained on).
    unseen: np.ndarray  # Treated ids held out or without training cells (OOD).

    def split_rows(self, split: str) -> pd.DataFrame:
        """cells.csv rows of `split` in example order."""
        rows = self.cells[self.cells["split"] == split].sort_values("split_index")
        if not np.array_equal(rows["split_index"].to_numpy(), np.arange(len(rows))):
            raise ValueError(f"{self.dataset_dir}/cells.csv: split_index of {split!r} is not 0..n-1")
        return rows

    def training_rows(self, split: str) -> pd.DataFrame:
        """Rows of `split` the models train on: controls and seen perturbations."""
        rows = self.split_rows(split)
        keep = self.is_control[rows["perturbation_id"]] | np.isin(rows["perturbation_id"],
                                                                  self.seen)
        return rows[keep]


def load_expression_screen(config: ml_collections.ConfigDict, *,
                           need_expression: bool = True) -> ExpressionScreen:
    """Reads a built screen, its expression.npy and the held-out perturbations of `config.data`."""
    from data_builders.raw_screen import read_tables  # noqa: PLC0415

    d = config.data
    report = read_dataset_report(d.path, d.image_size, example_preset="cellpainting_like")
    crop = int(report["options"].get("resize_to") or report["options"]["crop_size"])
    available = tuple(report["channels"])
    channels = tuple(d.channels) or available
    missing = [c for c in channels if c not in available]
    if missing:
        raise ValueError(f"data.channels {missing} are not channels of {d.path} ({available}); "
                         "set data.channels to a subset (empty: all, in dataset order)")
    tables = read_tables(d.path)
    cells, perts = tables["cells"], tables["perturbations"]
    names = perts["perturbation"].astype(str)
    for field in ("controls", "perturbations", "holdout"):
        unknown = [n for n in d[field] if n not in set(names)]
        if unknown:
            raise ValueError(f"data.{field} names perturbations not in {d.path}: {unknown}")
    if d.controls:
        is_control = names.isin(d.controls).to_numpy()
    else:
        is_control = perts["is_control"].astype(int).to_numpy().astype(bool)
    expression = None
    path = os.path.join(d.path, "expression.npy")
    if os.path.isfile(path):
        expression = np.load(path).astype(np.float32)
        if expression.ndim != 2 or expression.shape[0] != len(perts):
            raise ValueError(f"{path} has shape {expression.shape}; expected ({len(perts)}, genes)")
        if not np.isfinite(expression).all():
            bad = names[~np.isfinite(expression).all(axis=1)].tolist()
            raise ValueError(f"{path}: perturbations {bad[:5]} have non-finite expression values")
    elif need_expression:
        raise FileNotFoundError(
            f"{d.path} has no expression.npy: MorphDiff conditions on one L1000 vector per "
            "perturbation. Build the screen with `--expression ...` (data_builders/expression.py) "
            "or add one with data_builders.expression.write_expression")
    seen, unseen = seen_and_unseen(cells, names, is_control, d)
    if not seen.size:
        raise ValueError(f"{d.path}: no treated perturbation has training cells")
    index = np.array([available.index(c) for c in channels])
    return ExpressionScreen(d.path, channels, index, crop, cells, perts, expression, is_control,
                            seen, unseen)


def to_model_space(image: np.ndarray, channel_index: np.ndarray, image_size: int,
                   rng: np.random.Generator | None = None, flip_prob: float = 0.0) -> np.ndarray:
    """uint8 HWC crop -> the model's channels in [-1, 1] (x / 127.5 - 1, reference `5c.py`)."""
    x = prepare_image(image[..., channel_index], image_size, None, dequantize=False,
                      flip_prob=0.0)
    if rng is not None and flip_prob > 0:
        if rng.random() < flip_prob:
            x = x[:, ::-1]
        if rng.random() < flip_prob:
            x = x[::-1]
    return np.ascontiguousarray(x)


def open_split(dataset_dir: str, split: str):
    from data_builders.raw_screen import open_split as open_built  # noqa: PLC0415

    return open_built(dataset_dir, split)


# -- the train state -----------------------------------------------------------------------------

class MorphDiffState(TrainState):
    """A TrainState with frozen modules (autoencoder, perceptual network) checkpointed with it."""

    def __init__(self, models, optimizers, *, frozen: dict[str, nnx.Module],
                 ema_decay: float = 0.0):
        super().__init__(models, optimizers, ema_decay=ema_decay)
        self.frozen = nnx.data(dict(frozen))


def _frozen(module: nnx.Module) -> nnx.Module:
    """The module with its parameters turned into `FrozenParam`s (no optimizer, no gradient)."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    frozen = jax.tree.map(lambda v: FrozenParam(v.get_value()), params,
                          is_leaf=lambda v: isinstance(v, nnx.Variable))
    return nnx.merge(graphdef, frozen, rest)


def _zero_slot(make: Callable[[], nnx.Module]) -> nnx.Module:
    """The module `make` builds, all zeros: a slot that `load_pretrained` fills with trained
    weights, so the jitted init spends no random-number graph (compile time) on it."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), state))


def build_autoencoder(config: ml_collections.ConfigDict, num_channels: int,
                      rngs: nnx.Rngs) -> ae_lib.AutoencoderKL:
    a = config.autoencoder
    return ae_lib.AutoencoderKL(
        num_channels, num_channels, ch=a.ch, ch_mult=tuple(a.ch_mult),
        num_res_blocks=a.num_res_blocks, z_channels=a.z_channels, embed_dim=a.embed_dim,
        resolution=config.data.image_size, dtype=jnp.dtype(config.compute_dtype), rngs=rngs)


def _apply_conv(conv: nnx.Conv, kernel: jax.Array, x: jax.Array) -> jax.Array:
    """`conv` with its kernel replaced by `kernel` (for gradients w.r.t. the last layer)."""
    graphdef, state = nnx.split(conv)
    state = nnx.State({**state, "kernel": state["kernel"].replace(kernel)})
    return nnx.merge(graphdef, state)(x).astype(jnp.float32)


# -- stage 1: the autoencoder --------------------------------------------------------------------

class MorphDiffAutoencoderTask:
    """KL autoencoder + PatchGAN; models: autoencoder, discriminator."""

    sample_columns = 8

    def __init__(self, config: ml_collections.ConfigDict, spec: ExpressionScreen | None = None):
        self.config = config
        self.spec = load_expression_screen(config, need_expression=False) if spec is None else spec
        self.channels = len(self.spec.channels)
        from morphjax.models.perceptual import load_perceptual  # noqa: PLC0415

        # Loaded once on the host; `build` makes a same-shaped slot in the train state and
        # `load_pretrained` fills it, so the weights are state, not compiled-in constants.
        self.perceptual, self.perceptual_label = load_perceptual(
            config.loss.perceptual, self.channels, dtype=jnp.dtype(config.compute_dtype))
        print(f"autoencoder perceptual term: {self.perceptual_label}")

    # -- data ------------------------------------------------------------------------------------
    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        d, s = self.config.data, self.spec
        rows = s.training_rows(d.train_split)
        source = data.Subset(open_split(s.dataset_dir, d.train_split), rows["split_index"].to_numpy())
        index, size, flip = s.channel_index, d.image_size, d.flip_prob

        def transform(item, rng):
            return {"image": to_model_space(item["image"], index, size, rng, flip)}

        return data.make_train_dataset(
            source, batch_size=self.config.train.batch_size // process_count,
            seed=self.config.seed, transform=transform, process_index=process_index,
            process_count=process_count, num_workers=d.num_workers)

    def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset | None:
        d, s = self.config.data, self.spec
        rows = s.training_rows(d.eval_split)
        if not len(rows):
            return None
        source = data.Subset(open_split(s.dataset_dir, d.eval_split), rows["split_index"].to_numpy())
        index, size = s.channel_index, d.image_size
        return data.make_eval_dataset(
            source, batch_size=self.config.train.batch_size // process_count,
            transform=lambda item: {"image": to_model_space(item["image"], index, size)},
            process_index=process_index, process_count=process_count)

    # -- models ----------------------------------------------------------------------------------
    def build(self, rngs: nnx.Rngs) -> MorphDiffState:
        c = self.config
        autoencoder = build_autoencoder(c, self.channels, rngs)
        discriminator = ae_lib.PatchDiscriminator(
            self.channels, ndf=c.discriminator.ndf, n_layers=c.discriminator.n_layers,
            dtype=jnp.dtype(c.compute_dtype), rngs=rngs)
        models = {"autoencoder": autoencoder, "discriminator": discriminator}
        tx = make_optimizer(c.optimizer, c.train.total_steps)
        optimizers = {name: nnx.Optimizer(m, tx, wrt=nnx.Param) for name, m in models.items()}
        frozen = {}
        if self.perceptual is not None:
            frozen["perceptual"] = _zero_slot(lambda: self.perceptual)
        return MorphDiffState(models, optimizers, frozen=frozen)

    def load_pretrained(self, state: MorphDiffState) -> nnx.State:
        """The perceptual network's weights (converted VGG16 LPIPS or a Cell Painting CNN run)."""
        if self.perceptual is not None:
            nnx.update(state.frozen["perceptual"], nnx.state(self.perceptual))
        return nnx.state(state)

    def _perceptual(self, state: MorphDiffState, x: jax.Array, xrec: jax.Array) -> jax.Array:
        if "perceptual" not in state.frozen:
            return jnp.zeros((x.shape[0],), jnp.float32)
        return state.frozen["perceptual"](x, xrec)

    # -- steps -----------------------------------------------------------------------------------
    def train_step(self, state: MorphDiffState, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        c, loss_cfg = self.config, self.config.loss
        ae, disc = state.models["autoencoder"], state.models["discriminator"]
        factor = ae_lib.disc_factor(state.step.get_value(), loss_cfg.disc_start,
                                    loss_cfg.disc_factor)
        disc_graph, disc_state = nnx.split(disc)

        def d_logits(x):
            # Batch statistics, updates discarded: the generator step never trains D.
            return nnx.merge(disc_graph, disc_state, copy=True)(x, train=True)

        def ae_loss(ae, batch, rng):
            x = batch["image"]
            posterior = ae.encode(x)
            hidden = ae.decoder.hidden(ae.post_quant_conv(posterior.sample(rng)))
            conv_out = ae.decoder.conv_out
            kernel = conv_out.kernel.get_value()

            def nll_and_gan(kernel, hidden):
                xrec = _apply_conv(conv_out, kernel, hidden)
                p = loss_cfg.perceptual_weight * self._perceptual(state, x, xrec)
                nll = ae_lib.reconstruction_nll(x, xrec, p)
                return nll, ae_lib.generator_adv_loss(d_logits(xrec)), (xrec, p)

            # Adaptive weight: gradient norms w.r.t. the last layer only (taming
            # calculate_adaptive_weight); the hidden activation is held fixed.
            frozen_hidden = jax.lax.stop_gradient(hidden)
            frozen_kernel = jax.lax.stop_gradient(kernel)
            g_nll = jax.grad(lambda k: nll_and_gan(k, frozen_hidden)[0])(frozen_kernel)
            g_gan = jax.grad(lambda k: nll_and_gan(k, frozen_hidden)[1])(frozen_kernel)
            weight = ae_lib.adaptive_weight(jnp.linalg.norm(g_nll), jnp.linalg.norm(g_gan),
                                            loss_cfg.disc_weight)
            nll, gan, (xrec, p) = nll_and_gan(kernel, hidden)
            kl = ae_lib.kl_loss(posterior)
            loss = nll + loss_cfg.kl_weight * kl + weight * factor * gan
            aux = {"nll": nll, "kl": kl, "g_loss": gan, "d_weight": weight,
                   "rec_l1": jnp.abs(x - xrec).mean(), "perceptual": p.mean(),
                   "xrec": jax.lax.stop_gradient(xrec)}
            return loss, aux

        loss, aux, grads = grads_lib.value_and_grad(ae_loss, ae, batch, rng,
                                                    accum_steps=c.train.grad_accum_steps)
        state.optimizers["autoencoder"].update(ae, grads)
        xrec = aux.pop("xrec")

        def d_loss(disc, batch, rng):
            del rng
            real, fake = disc(batch["image"], train=True), disc(batch["xrec"], train=True)
            loss = factor * ae_lib.hinge_d_loss(real, fake)
            return loss, {"logits_real": real.mean(), "logits_fake": fake.mean()}

        if c.train.grad_accum_steps > 1:  # aux stacks micro-batches: restore the batch order.
            xrec = _unsplit_micro(xrec, c.train.grad_accum_steps)
        d_value, d_aux, d_grads = grads_lib.value_and_grad(
            d_loss, disc, {"image": batch["image"], "xrec": xrec}, rng,
            accum_steps=c.train.grad_accum_steps)
        state.optimizers["discriminator"].update(disc, d_grads)
        return {"loss": loss, "d_loss": d_value, "disc_factor": factor, **aux, **d_aux}

    def eval_step(self, state: MorphDiffState, batch: Any) -> dict[str, jax.Array]:
        ae = state.eval_model("autoencoder")
        x, valid = batch["image"], batch["valid"].astype(jnp.float32)
        xrec, posterior = ae(x, sample_posterior=False)
        l1 = jnp.abs(x - xrec).reshape(x.shape[0], -1).mean(-1)
        kl = posterior.kl()
        return {"rec_l1": (l1 * valid).sum(), "kl": (kl * valid).sum(), "count": valid.sum()}

    def samples(self, state: MorphDiffState, batch: Any) -> dict[str, jax.Array]:
        ae = state.eval_model("autoencoder")
        x = batch["image"][:8]
        xrec, _ = ae(x, sample_posterior=False)
        return {"input_vs_reconstruction": jnp.concatenate([x, jnp.clip(xrec, -1, 1)])}


def _unsplit_micro(x: jax.Array, steps: int) -> jax.Array:
    """Inverse of grads._split_micro for (steps, B / steps, ...) stacks."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


# -- stage 2: latent diffusion -------------------------------------------------------------------

class LatentScale(nnx.Variable):
    """The latent scale factor 1 / std(z) (CompVis scale_by_std), saved with the checkpoint."""


class MorphDiffLDM(nnx.Module):
    """The trained part of MorphDiff: expression -> context tokens, and the denoising U-Net."""

    def __init__(self, unet: UNet, context: ExpressionContext):
        self.unet = unet
        self.context = context
        self.scale_factor = LatentScale(jnp.ones((), jnp.float32))

    def denoise(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        return self.unet(x, t, context)


def schedule_from_config(config: ml_collections.ConfigDict) -> diffusion.Schedule:
    d = config.diffusion
    return diffusion.make_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start,
                                   beta_end=d.beta_end)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    from morphjax import config as cfg  # noqa: PLC0415

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.autoencoder {workdir} is not a morphjax run (no "
                                "config.json); train it with `morphjax train --config "
                                "configs/morphdiff.py:PRESET,autoencoder --workdir DIR`")
    with open(path) as f:
        return cfg.from_json(f.read())


class MorphDiffLdmTask:
    """Latent diffusion on a frozen autoencoder; model: ldm (U-Net + expression context)."""

    sample_columns = 8

    def __init__(self, config: ml_collections.ConfigDict, spec: ExpressionScreen | None = None):
        self.config = config
        self.spec = load_expression_screen(config) if spec is None else spec
        if not config.model.autoencoder:
            raise ValueError("model.autoencoder is empty: set it to the workdir of a trained "
                             "autoencoder run (stage 1, configs/morphdiff.py:PRESET,autoencoder)")
        self.ae_config = read_run_config(config.model.autoencoder)
        if self.ae_config.task != "morphdiff_autoencoder":
            raise ValueError(f"model.autoencoder {config.model.autoencoder} is a "
                             f"{self.ae_config.task!r} run, not a MorphDiff autoencoder")
        for field in ("image_size", "channels"):
            ours, theirs = config.data[field], self.ae_config.data[field]
            if tuple(np.atleast_1d(ours)) != tuple(np.atleast_1d(theirs)):
                raise ValueError(f"data.{field} is {ours} but the autoencoder was trained with "
                                 f"{theirs}; set --set data.{field}=... to match")
        self.channels = len(self.spec.channels)
        self.schedule = schedule_from_config(config)
        self.genes = self.spec.expression.shape[1]
        self._cache: dict[str, Any] = {}

    # -- latents ---------------------------------------------------------------------------------
    def latent_cache(self, split: str):
        """Posterior moments of every crop of `split`, cached next to the autoencoder run."""
        from morphjax import latents  # noqa: PLC0415

        if split not in self._cache:
            self._cache[split] = latents.ensure_cache(self.config.model.autoencoder, self.spec,
                                                      split)
        return self._cache[split]

    def _latent_dataset(self, split: str, rows: pd.DataFrame):
        cache, expression = self.latent_cache(split), self.spec.expression
        source = data.Subset(cache, rows["split_index"].to_numpy())

        def transform(item, rng=None):
            del rng
            return {"moments": item["moments"],
                    "expression": expression[int(item["perturbation_id"])]}

        return source, transform

    def train_dataset(self, process_index: int, process_count: int) -> grain.IterDataset:
        d = self.config.data
        source, transform = self._latent_dataset(d.train_split,
                                                 self.spec.training_rows(d.train_split))
        return data.make_train_dataset(
            source, batch_size=self.config.train.batch_size // process_count,
            seed=self.config.seed, transform=transform, process_index=process_index,
            process_count=process_count, num_workers=d.num_workers)

    def eval_dataset(self, process_index: int, process_count: int) -> grain.IterDataset | None:
        d = self.config.data
        rows = self.spec.training_rows(d.eval_split)
        if not len(rows):
            return None
        source, transform = self._latent_dataset(d.eval_split, rows)
        return data.make_eval_dataset(
            source, batch_size=self.config.train.batch_size // process_count,
            transform=transform, process_index=process_index, process_count=process_count)

    # -- models ----------------------------------------------------------------------------------
    def build_ldm(self, rngs: nnx.Rngs) -> MorphDiffLDM:
        c, u, k = self.config, self.config.unet, self.config.conditioning
        latent_channels = self.ae_config.autoencoder.embed_dim
        dtype = jnp.dtype(c.compute_dtype)
        unet = UNet(in_channels=latent_channels, out_channels=latent_channels,
                    model_channels=u.model_channels, channel_mult=tuple(u.channel_mult),
                    num_res_blocks=u.num_res_blocks,
                    attention_resolutions=tuple(u.attention_resolutions), num_heads=u.num_heads,
                    transformer_depth=u.transformer_depth, context_dim=k.context_dim,
                    dropout=u.dropout, remat=u.remat, dtype=dtype, rngs=rngs)
        context = ExpressionContext(self.genes, num_tokens=k.num_tokens, context_dim=k.context_dim,
                                    mode=k.mode, seed=k.seed, dtype=dtype, rngs=rngs)
        return MorphDiffLDM(unet, context)

    def build(self, rngs: nnx.Rngs) -> MorphDiffState:
        c = self.config
        ldm = self.build_ldm(rngs)
        optimizer = nnx.Optimizer(ldm, make_optimizer(c.optimizer, c.train.total_steps),
                                  wrt=nnx.Param)
        autoencoder = _zero_slot(lambda: _frozen(
            build_autoencoder(self.ae_config, self.channels, nnx.Rngs(0))))
        return MorphDiffState({"ldm": ldm}, {"ldm": optimizer},
                              frozen={"autoencoder": autoencoder}, ema_decay=c.train.ema_decay)

    def load_pretrained(self, state: MorphDiffState) -> nnx.State:
        """The trained autoencoder's weights (its EMA copy if any) and the latent scale factor."""
        from morphjax import latents  # noqa: PLC0415

        trained = latents.autoencoder_params(self.config.model.autoencoder)
        ours = nnx.to_flat_state(nnx.state(state.frozen["autoencoder"], FrozenParam))
        if set(trained) != {path for path, _ in ours}:
            raise ValueError(f"the autoencoder in {self.config.model.autoencoder} does not match "
                             "the architecture in its config.json")
        for path, variable in ours:
            if variable.get_value().shape != trained[path].shape:
                raise ValueError(f"autoencoder weight {'/'.join(map(str, path))} has shape "
                                 f"{trained[path].shape}, expected {variable.get_value().shape}")
            variable.set_value(jnp.asarray(trained[path], variable.get_value().dtype))
        m = self.config.model
        scale = (latents.scale_factor(self.latent_cache(self.config.data.train_split),
                                      self.spec.training_rows(self.config.data.train_split),
                                      seed=self.config.seed)
                 if m.scale_by_std else float(m.scale_factor))
        print(f"latent scale factor: {scale:.5g}" + (" (1 / std of the training latents)"
                                                      if m.scale_by_std else ""))
        for model in (state.models["ldm"], *state.ema.values()):
            model.scale_factor.set_value(jnp.float32(scale))
        return nnx.state(state)

    # -- steps -----------------------------------------------------------------------------------
    def context(self, ldm: MorphDiffLDM, expression: jax.Array) -> jax.Array:
        return ldm.context(expression.astype(jnp.float32))

    def _loss(self, ldm: MorphDiffLDM, batch: Any, rng: jax.Array):
        l = self.config.loss
        z_rng, loss_rng = jax.random.split(rng)
        mean, logvar = jnp.split(batch["moments"].astype(jnp.float32), 2, axis=-1)
        std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
        z = (mean + std * jax.random.normal(z_rng, mean.shape)) * ldm.scale_factor.get_value()
        context = self.context(ldm, batch["expression"])
        null = jnp.zeros_like(context) if l.cond_drop_prob > 0 else None
        return diffusion.diffusion_loss(ldm.denoise, self.schedule, z, context, loss_rng,
                                        parameterization=l.parameterization,
                                        loss_type=l.loss_type, cond_drop_prob=l.cond_drop_prob,
                                        null_context=null)

    def train_step(self, state: MorphDiffState, batch: Any, rng: jax.Array) -> dict[str, jax.Array]:
        ldm = state.models["ldm"]

        def loss_fn(ldm, batch, rng):
            loss, aux = self._loss(ldm, batch, rng)
            return loss, {"t_mean": aux["t"].astype(jnp.float32).mean()}

        loss, aux, grads = grads_lib.value_and_grad(loss_fn, ldm, batch, rng,
                                                    accum_steps=self.config.train.grad_accum_steps)
        state.optimizers["ldm"].update(ldm, grads)
        return {"loss": loss, **aux}

    def eval_step(self, state: MorphDiffState, batch: Any) -> dict[str, jax.Array]:
        ldm = state.eval_model("ldm")
        valid = batch["valid"].astype(jnp.float32)
        _, aux = self._loss(ldm, batch, jax.random.key(self.config.seed))
        return {"loss": (aux["loss_per_example"] * valid).sum(), "count": valid.sum()}

    def generate(self, state: MorphDiffState, expression: jax.Array, rng: jax.Array, *,
                 steps: int | None = None) -> jax.Array:
        """G2I: DDIM from noise with the expression's context, decoded to [-1, 1] images."""
        s = self.config.sample
        ldm = state.eval_model("ldm")
        size = self.config.data.image_size // 2 ** (len(self.ae_config.autoencoder.ch_mult) - 1)
        shape = (expression.shape[0], size, size, self.ae_config.autoencoder.embed_dim)
        z = diffusion.ddim_sample(ldm.denoise, self.schedule, shape,
                                  self.context(ldm, expression), rng,
                                  steps=steps or s.ddim_steps, eta=s.eta,
                                  guidance_scale=s.guidance_scale,
                                  null_context=self._null(ldm, expression),
                                  parameterization=self.config.loss.parameterization)
        return self.decode(state, z)

    def transform(self, state: MorphDiffState, images: jax.Array, expression: jax.Array,
                  rng: jax.Array, *, strength: float | None = None,
                  steps: int | None = None) -> jax.Array:
        """I2I: SDEdit from control images (encode, noise to `strength`, DDIM decode)."""
        s = self.config.sample
        ldm = state.eval_model("ldm")
        enc_rng, edit_rng = jax.random.split(rng)
        z = self.encode(state, images, enc_rng)
        z = diffusion.sdedit(ldm.denoise, self.schedule, z, self.context(ldm, expression),
                             edit_rng, strength=s.i2i_strength if strength is None else strength,
                             steps=steps or s.i2i_steps, eta=s.eta,
                             guidance_scale=s.guidance_scale,
                             null_context=self._null(ldm, expression),
                             parameterization=self.config.loss.parameterization)
        return self.decode(state, z)

    def _null(self, ldm: MorphDiffLDM, expression: jax.Array):
        if self.config.sample.guidance_scale == 1.0:
            return None
        return jnp.zeros_like(self.context(ldm, expression))

    def encode(self, state: MorphDiffState, images: jax.Array, rng: jax.Array) -> jax.Array:
        """Posterior sample x scale factor (reference img2img: encode_first_stage + sample)."""
        ae, ldm = state.frozen["autoencoder"], state.eval_model("ldm")
        return ae.encode(images).sample(rng) * ldm.scale_factor.get_value()

    def decode(self, state: MorphDiffState, z: jax.Array) -> jax.Array:
        ae, ldm = state.frozen["autoencoder"], state.eval_model("ldm")
        return jnp.clip(ae.decode(z / ldm.scale_factor.get_value()), -1.0, 1.0)

    def samples(self, state: MorphDiffState, batch: Any) -> dict[str, jax.Array]:
        n = min(8, batch["expression"].shape[0])
        ae = state.frozen["autoencoder"]
        mean, _ = jnp.split(batch["moments"][:n].astype(jnp.float32), 2, axis=-1)
        generated = self.generate(state, batch["expression"][:n], jax.random.key(0))
        return {"reconstructed_vs_generated": jnp.concatenate(
            [jnp.clip(ae.decode(mean), -1.0, 1.0), generated])}

