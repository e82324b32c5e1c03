"""`morphjax bench impa`: IMPA train-step throughput at the paper config, side by side with the
public PyTorch implementation when its source directory is given and torch is installed.

Both sides run the same step on the same random batch: one discriminator update (real/fake BCE +
R1 on real images) then one generator/style-encoder/condition-encoder update (adversarial, style,
diversity, cycle), Adam (1e-4, betas (0, 0.99), L2 1e-4). The morphjax step is the training
task's own jitted step; the PyTorch step is written here from the reference solver's order of
operations and calls the reference's modules (`IMPA/model.py` of the given directory). Timings
exclude compilation / warm-up; memory is the device's peak when it reports one, else the size
of the train state per device.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import ml_collections
import numpy as np
import pandas as pd

from morphjax import config as cfg
from morphjax import parallel
from morphjax.train import impa as impa_task
from morphjax.train import loop

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def synthetic_spec(config: ml_collections.ConfigDict, num_domains: int, channels: int
                   ) -> impa_task.ScreenSpec:
    """A dataset description without a dataset: `num_domains` compounds with random fingerprints."""
    rng = np.random.default_rng(0)
    n = num_domains + 1  # + the control
    perts = pd.DataFrame({"perturbation": ["DMSO"] + [f"drug{i}" for i in range(num_domains)],
                          "type": ["control"] + ["compound"] * num_domains,
                          "is_control": [1] + [0] * num_domains})
    table = (rng.random((n, config.data.morgan_bits)) < 0.05).astype(np.float32)
    table[0] = 0
    domain_of = np.arange(-1, num_domains, dtype=np.int32)
    return impa_task.ScreenSpec(
        dataset_dir="", channels=tuple(f"ch{i}" for i in range(channels)), cells=pd.DataFrame(), perturbations=perts,
        seen=np.arange(1, n), unseen=np.zeros(0, np.int64), modalities=("compound",),
        head_of=np.zeros(n, np.int32), domain_of=domain_of, num_domains=num_domains,
        tables={"compound": table})


def random_batch(config, num_domains: int, channels: int, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = config.data.image_size
    shape = (batch_size, size, size, channels)
    return {"control": rng.uniform(-1, 1, shape).astype(np.float32),
            "treated": rng.uniform(-1, 1, shape).astype(np.float32),
            "perturbation_id": rng.integers(1, num_domains + 1, batch_size).astype(np.int32)}


def _peak_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def time_morphjax(config, num_domains: int, channels: int, steps: int, warmup: int) -> dict:
    task = impa_task.ImpaTask(config, spec=synthetic_spec(config, num_domains, channels))
    s = loop.setup(config, task=task)
    state = s.init_state()
    step = loop.compile_train_step(s)
    batch = parallel.global_batch(random_batch(config, num_domains, channels,
                                               config.train.batch_size),
                                  parallel.batch_sharding(s.mesh))
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    device = jax.devices()[0]
    state_bytes = max(parallel.bytes_per_device(state).values())
    return {"implementation": f"morphjax (jax {jax.__version__}, {config.compute_dtype})",
            "device": f"{jax.device_count()} x {device.device_kind}",
            "batch": config.train.batch_size, "s/step": seconds,
            "images/s": config.train.batch_size / seconds, "first step s": compile_s,
            "peak MiB/device": (_peak_bytes(device) or state_bytes) / 2**20}


def _load_reference(directory: str):
    path = os.path.join(directory, "IMPA", "model.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--torch-reference {directory}: no IMPA/model.py there (give the "
                                "root of a theislab/IMPA checkout)")
    spec = importlib.util.spec_from_file_location("impa_reference_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_torch(directory: str, config, num_domains: int, channels: int, steps: int,
               warmup: int) -> dict:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    ref = _load_reference(directory)
    m = config.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = config.data.image_size
    G = ref.Generator(img_size=size, style_dim=m.style_dim, max_conv_dim=m.max_conv_dim,
                      in_channels=channels, dim_in=m.dim_in).to(device)
    E = ref.StyleEncoder(img_size=size, style_dim=m.style_dim, max_conv_dim=m.max_conv_dim,
                         in_channels=channels, dim_in=m.dim_in).to(device)
    D = ref.Discriminator(img_size=size, num_domains=num_domains, max_conv_dim=m.max_conv_dim,
                          in_channels=channels, dim_in=m.dim_in).to(device)
    f = ref.MappingNetworkSingleStyle(latent_dim=config.data.morgan_bits + m.noise_dim,
                                      style_dim=m.style_dim, num_layers=m.mapping_layers).to(device)
    o = config.optimizer
    opts = {name: torch.optim.Adam(net.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                   weight_decay=o.weight_decay)
            for name, net in (("G", G), ("E", E), ("D", D), ("f", f))}
    batch = random_batch(config, num_domains, channels, config.train.batch_size)
    to = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device)  # noqa: E731
    x_ctrl, x_trt = to(batch["control"]), to(batch["treated"])
    y = torch.from_numpy(batch["perturbation_id"].astype(np.int64) - 1).to(device)
    table = torch.from_numpy(synthetic_spec(config, num_domains, channels).tables["compound"][1:]
                             ).to(device)
    bce = F.binary_cross_entropy_with_logits
    w = config.loss

    def step():
        b = x_ctrl.shape[0]
        z1 = torch.randn(b, m.noise_dim, device=device)
        z2 = torch.randn(b, m.noise_dim, device=device)
        s1 = f(torch.cat([table[y], z1], 1))
        s2 = f(torch.cat([table[y], z2], 1))
        real = x_trt.clone().requires_grad_()
        out = D(real, y, None)
        loss_real = bce(out, torch.ones_like(out))
        grad = torch.autograd.grad(out.sum(), real, create_graph=True)[0]
        r1 = 0.5 * grad.pow(2).reshape(b, -1).sum(1).mean()
        with torch.no_grad():
            fake = G(x_ctrl, s1)[1]
        out = D(fake, y, None)
        loss_d = loss_real + bce(out, torch.zeros_like(out)) + w.r1 * r1
        opts["D"].zero_grad()
        loss_d.backward(retain_graph=True)
        opts["D"].step()
        fake = G(x_ctrl, s1)[1]
        out = D(fake, y, None)
        adv = bce(out, torch.ones_like(out))
        sty = (E(fake) - s1).abs().mean()
        ds = (fake - G(x_ctrl, s2)[1].detach()).abs().mean()
        cyc = (G(fake, E(x_ctrl))[1] - x_ctrl).abs().mean()
        loss_g = adv + w.style * sty - w.diversity * ds + w.cycle * cyc
        for name in ("G", "E", "f"):
            opts[name].zero_grad()
        loss_g.backward()
        for name in ("G", "E", "f"):
            opts[name].step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    step()
    sync()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"implementation": f"PyTorch reference (torch {torch.__version__}, float32)",
            "device": name, "batch": config.train.batch_size, "s/step": seconds,
            "images/s": config.train.batch_size / seconds, "first step s": first,
            "peak MiB/device": peak}


def bench_impa(preset: str = "bbbc021", *, batch_size: int | None = None, steps: int = 10,
               warmup: int = 2, num_domains: int = 5, overrides: tuple[str, ...] = (),
               torch_reference: str | None = None) -> pd.DataFrame:
    """Prints (and returns) the throughput table; ratio = morphjax images/s over each row's."""
    sets = [f"train.batch_size={batch_size}"] if batch_size else []
    config = cfg.load_config(os.path.join(CONFIGS, "impa.py") + f":{preset}",
                             tuple(sets) + tuple(overrides))
    channels = 3
    rows = [time_morphjax(config, num_domains, channels, steps, warmup)]
    if torch_reference:
        rows.append(time_torch(torch_reference, config, num_domains, channels, steps, warmup))
    table = pd.DataFrame(rows)
    table["speed-up of morphjax"] = table["images/s"].iloc[0] / table["images/s"]
    m = config.model
    print(f"IMPA train step: {config.data.image_size}x{config.data.image_size}x{channels}, "
          f"{num_domains} conditions, widths {m.dim_in}..{m.max_conv_dim}, style {m.style_dim}, "
          f"noise {m.noise_dim}, {steps} timed steps after {warmup} warm-up")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table
