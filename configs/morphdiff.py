"""MorphDiff: L1000 expression -> cell morphology by latent diffusion (morphdiff.txt, Methods).

Two stages, as in the paper and its reference code:
  morphjax train --config configs/morphdiff.py:synthetic,autoencoder --workdir runs/md_ae
  morphjax train --config configs/morphdiff.py:synthetic --workdir runs/md_ldm \
      --set model.autoencoder=runs/md_ae
  morphjax sample --workdir runs/md_ldm --mode g2i --perturbation NAME        # or --mode i2i
  python experiments/morphdiff_synthetic.py                                  # both stages + eval

Stage 1 (`PRESET,autoencoder`): the KL autoencoder ("MVAE") on single-cell crops: L1 +
perceptual + 1e-6 KL + hinge PatchGAN from `loss.disc_start` with the adaptive weight; Adam 2.4e-5,
betas (0.5, 0.9), batch 8 x 2 accumulated. Stage 2 (`PRESET`, the default stage): the U-Net
denoises the frozen autoencoder's latents (scaled by 1 / std(z) from the data), conditioned by
cross-attention on context tokens projected from the perturbation's L1000 vector (a frozen random
Linear(G, tokens x 12), seeded, as the reference); eps target, L1 loss, 1000 steps, scaled-linear
betas 0.0015 -> 0.0155, AdamW 4.8e-5 with a 200-step linear warm-up, batch 8, EMA 0.9999 with
the LitEma warm-up, no classifier-free guidance. The latents of the training crops are encoded
once and cached to ArrayRecord next to the autoencoder run (`<autoencoder>/latents/`).

Presets:
- tiny: tests, seconds on a CPU.
- synthetic: the cellpainting_like small synthetic screen (5 channels, compounds + CRISPR +
  ORF, 978-gene expression vectors), 32 px crops -> 8x8x4 latents, narrow networks and a larger
  learning rate so both stages learn in minutes on a CPU (paper rates need ~10^5 steps).
- synthetic_bbbc021: the same networks on the bbbc021_like small synthetic screen (3 channels,
  31 compounds in 12 MoAs), whose strongest compounds change cells several times more than
  cellpainting_like's (classical features): OOD are the strongest compounds of MoAs with seen
  members. Learned expression projection and 10% condition dropout, so
  samples can be guided (`--guidance`); MorphDiff's own preset has neither.
- jump_orf: JUMP ORF overexpression, U2OS (morphdiff.txt Datasets: 130 genes, 13 OOD).
- cdrp: CDRP compounds, U2OS (959 compounds, 96 OOD).
- lincs: LINCS compounds, A549 (61 compounds, leave-one-out by target/MoA).
Real presets need `data.path` (a dataset built by `morphjax build ... --crop 128` with
`--expression ...`) and `data.holdout` (the OOD perturbations). Paper scale: 5 x 128 x 128 crops,
4 x 32 x 32 latents, autoencoder 55,330,537 and U-Net 378,499,012 parameters. The reference
code sets no training length; the step counts below are ours.
"""

import copy

import ml_collections

from morphjax.config import apply_preset
from morphjax.train.optim import optimizer_config

STAGES = ("autoencoder", "ldm")

# Per preset and stage: only what differs from the paper defaults in get_config.
PRESETS = {
    "tiny": dict(
        data=dict(path="", image_size=16, channels=()),
        autoencoder=dict(ch=32, ch_mult=(1, 2), num_res_blocks=1),
        discriminator=dict(ndf=8, n_layers=2),
        unet=dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(1, 2), num_heads=2),
        conditioning=dict(num_tokens=16),
        loss=dict(perceptual="none", disc_start=3),
        train=dict(batch_size=8, grad_accum_steps=1, total_steps=6, log_every=2, eval_every=6,
                   sample_every=6, checkpoint_every=3),
        sample=dict(ddim_steps=5),
    ),
    "synthetic": dict(
        data=dict(path="runs/data/cellpainting_like_small/dataset", image_size=32,
                  channels=(),
                  # Unseen (OOD), absent from both stages: strong perturbations of every
                  # modality, generated from their expression vectors alone. Two compounds
                  # (ABL1 and ADRA2B inhibitors), a CRISPR guide whose sibling guide is seen
                  # (TNNC1), and two ORFs whose complexes have seen members (UGT1A9, PDE4D).
                  holdout=("BRD-K16730910-001-07-3", "BRD-A65597028-003-08-1",
                           "BRDN0001480594", "ccsbBroad304_03441", "ccsbBroad304_11023")),
        autoencoder=dict(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1),
        discriminator=dict(ndf=32, n_layers=2),
        unet=dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(1, 2), num_heads=4),
        conditioning=dict(num_tokens=64),
        # Without the GAN the L1-only decoder is smooth and misses the crops' texture: on 256
        # test cells its classical-feature FID to real cells was 1535 at step 2000 (L1-only)
        # and 280 at step 4000 (GAN from 2500); real vs real cells: 25. Without downsampling
        # (`autoencoder.ch_mult=(1,)`, z 8: 32x32x8 latents, the paper's 4 px per latent pixel
        # at our 3x coarser crops) the L1-only round trip reaches 87 at step 3000, but the
        # U-Net then costs ~16x more per step (experiments/morphdiff_autoencoder_check.py).
        loss=dict(perceptual="none", disc_start=2500),
        sample=dict(ddim_steps=50),
        stage=dict(
            autoencoder=dict(optimizer=dict(learning_rate=2e-4),
                             train=dict(total_steps=4000, batch_size=16, grad_accum_steps=1,
                                        log_every=100, eval_every=1000, sample_every=1000,
                                        checkpoint_every=500)),
            ldm=dict(optimizer=dict(learning_rate=3e-4),
                     train=dict(total_steps=1500, batch_size=32, log_every=50,
                                eval_every=750, sample_every=750, checkpoint_every=250,
                                ema_decay=0.999))),
    ),
    "jump_orf": dict(
        data=dict(controls=("EMPTY",)),
        stage=dict(autoencoder=dict(train=dict(total_steps=150_000)),
                   ldm=dict(train=dict(total_steps=300_000)))),
    "cdrp": dict(
        data=dict(controls=("DMSO",)),
        stage=dict(autoencoder=dict(train=dict(total_steps=300_000)),
                   ldm=dict(train=dict(total_steps=500_000)))),
    "lincs": dict(
        data=dict(controls=("DMSO",)),
        stage=dict(autoencoder=dict(train=dict(total_steps=150_000)),
                   ldm=dict(train=dict(total_steps=200_000)))),
}

# The synthetic preset on the bbbc021_like screen: same networks, steps and rates.
PRESETS["synthetic_bbbc021"] = copy.deepcopy(PRESETS["synthetic"])
PRESETS["synthetic_bbbc021"].update(
    data=dict(path="runs/data/bbbc021_like_small/dataset", image_size=32, channels=(),
              # Unseen (OOD): the three strongest compounds whose MoA keeps seen members (taxol:
              # docetaxel, epothilone B; vincristine, demecolcine: colchicine, nocodazole) and
              # two milder ones (etoposide; simvastatin: lovastatin).
              holdout=("taxol", "vincristine", "demecolcine", "etoposide", "simvastatin")),
    conditioning=dict(num_tokens=64, mode="learned"),
    # GAN from step 1500 of 2500: the round trip of `synthetic` was as good at 3000 as at 4000.
    loss=dict(perceptual="none", disc_start=1500, cond_drop_prob=0.1))
PRESETS["synthetic_bbbc021"]["stage"]["autoencoder"]["train"]["total_steps"] = 2500
# 10,000 LDM steps (~80 min on 2 CPU cores): the run of
# experiments/results/morphdiff_synthetic_bbbc021_cpu.md.
PRESETS["synthetic_bbbc021"]["stage"]["ldm"]["train"].update(
    total_steps=10_000, eval_every=2500, sample_every=2500, checkpoint_every=500)


def _split_arg(arg: str) -> tuple[str, str]:
    preset, _, stage = arg.partition(",")
    stage = stage or "ldm"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} in {arg!r}; write PRESET or PRESET,STAGE "
                         f"with STAGE one of {STAGES}")
    return preset, stage


def get_config(arg: str = "synthetic") -> ml_collections.ConfigDict:
    """`PRESET` (the diffusion stage) or `PRESET,autoencoder`."""
    preset, stage = _split_arg(arg)
    c = ml_collections.ConfigDict()
    c.task = "morphdiff_autoencoder" if stage == "autoencoder" else "morphdiff_ldm"
    c.preset = arg
    c.seed = 23  # The reference main.py default.
    c.compute_dtype = "float32"  # fp32 in the reference; bfloat16 on accelerators.

    c.data = dict(
        path="",  # A dataset built by `morphjax build` with an expression.npy (L1000 vectors).
        train_split="train",
        eval_split="test",
        image_size=128,  # 5 x 128 x 128 single-cell crops (reference `ldm/data/5c.py`).
        channels=("DNA", "ER", "RNA", "AGP", "Mito"),  # Picked by name; empty: dataset order.
        controls=(),  # Control perturbation names; empty: the dataset's is_control column.
        perturbations=(),  # Train on these (plus controls) only; empty: all with expression.
        holdout=(),  # OOD perturbations: absent from both stages, generated from expression.
        flip_prob=0.0,  # The reference 5-channel dataset applies no augmentation.
        num_workers=0,
    )
    # KL autoencoder (notes section 1): ch 128, mult (1, 2, 4), 2 res blocks, z 4, double z.
    c.autoencoder = dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=4, embed_dim=4)
    c.discriminator = dict(ndf=64, n_layers=3)  # PatchGAN, BatchNorm.
    # Diffusion U-Net (notes section 2): 192 ch, mult (1, 2, 2, 4, 4), attention at 32/16/8/4.
    c.unet = dict(model_channels=192, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
                  attention_resolutions=(1, 2, 4, 8), num_heads=8, transformer_depth=1,
                  dropout=0.0, remat=False)
    c.conditioning = dict(
        mode="frozen_random",  # The reference's untrained Linear(977, 12288); or "learned".
        seed=0,  # Seed of the frozen projection (the same projection in every run).
        num_tokens=1024,  # 32 x 32 context tokens ...
        context_dim=12,  # ... of dimension 12.
    )
    c.loss = dict(
        # Autoencoder (taming LPIPSWithDiscriminator): perceptual = "vgg16:/path/lpips_vgg16.npz"
        # (LPIPS per channel, the reference), "cpcnn:/path/to/cpcnn_run" (a morphjax-trained Cell
        # Painting CNN's features; labelled as not LPIPS), or "none".
        perceptual="none",
        perceptual_weight=1.0,
        kl_weight=1e-6,
        disc_start=50_001,
        disc_weight=0.5,
        disc_factor=1.0,
        # Diffusion.
        parameterization="eps",
        loss_type="l1",
        cond_drop_prob=0.0,  # > 0: classifier-free guidance training (off in MorphDiff).
    )
    c.diffusion = dict(num_timesteps=1000, schedule="scaled_linear", beta_start=0.0015,
                       beta_end=0.0155)
    c.model = dict(
        autoencoder="",  # LDM stage: the workdir of the trained autoencoder run.
        scale_by_std=True,  # scale_factor = 1 / std(z) over the cached training latents.
        scale_factor=1.0,  # Used when scale_by_std is False.
    )
    c.sample = dict(
        ddim_steps=100, eta=0.0,  # G2I (gene2img_5c.py).
        i2i_strength=0.55, i2i_steps=50,  # I2I / SDEdit (gene_img2img_5c.py, README).
        guidance_scale=1.0,
    )
    c.eval = dict(samples_per_perturbation=64, strong_quantile=0.5, knn=5)

    if stage == "autoencoder":
        # Adam 2.4e-5 = 1.5e-6 x batch 8 x accumulate 2 (scale_lr), betas (0.5, 0.9), no schedule;
        # the same optimizer for the discriminator.
        c.optimizer = optimizer_config("adam", learning_rate=2.4e-5, b1=0.5, b2=0.9)
        c.train = dict(total_steps=100_000, batch_size=16, grad_accum_steps=2)  # 2 x 8.
    else:
        # AdamW 4.8e-5 = 6e-6 x batch 8 (scale_lr), torch defaults, 200-step linear warm-up.
        c.optimizer = optimizer_config("adamw", learning_rate=4.8e-5, weight_decay=0.01,
                                       schedule="warmup_constant", warmup_steps=200)
        c.train = dict(total_steps=200_000, batch_size=8, grad_accum_steps=1)
    c.train.update(dict(log_every=100, eval_every=5000, sample_every=5000,
                        checkpoint_every=1500, keep_checkpoints=3, async_checkpoint=True,
                        ema_decay=0.9999 if stage == "ldm" else 0.0,
                        ema_warmup=stage == "ldm"))  # LitEma: min(decay, (1+n)/(10+n)).

    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = (("conv_out", "tensor"), ("embed", None), ("mlp", "tensor"),
                        ("heads", "tensor"))
    c.fsdp_min_size = 2**16

    overrides = dict(PRESETS[preset])
    per_stage = overrides.pop("stage", {}).get(stage, {})
    apply_preset(c, overrides, preset)
    apply_preset(c, per_stage, arg)
    return c
