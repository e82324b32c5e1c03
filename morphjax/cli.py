"""`morphjax <verb>`: the command line. Each verb exists only once it works end to end."""

from __future__ import annotations

import argparse
import os
import re
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE.py:ARG",
                   help="config file and preset, e.g. configs/classifier.py:tiny")
    p.add_argument("--workdir", required=True, help="run directory (created; resumed if it has checkpoints)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, type-checked, e.g. --set train.batch_size=64 (repeatable)")


_BUILDER_OPTIONS = {  # builder option -> CLI dest
    "crop_size": "crop", "resize_to": "resize", "illumination": "illumination",
    "illumination_sigma": "illumination_sigma", "split": "split",
    "test_fraction": "test_fraction", "qc_min_std": "qc_min_std",
    "qc_min_sharpness": "qc_min_sharpness", "stretch_percentiles": "stretch_percentiles",
}


def _add_builder_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("crops, correction, filters and splits")
    g.add_argument("--crop", type=int, default=96, help="crop side in pixels, centred on each nucleus")
    g.add_argument("--resize", type=int, default=None,
                   help="resize crops to this side (IMPA large field of view: --crop 256 --resize 128)")
    g.add_argument("--illumination", default="impa", choices=("impa", "deepprofiler", "none"),
                   help="impa: plate 10th-percentile flat field, log, 8 bit; deepprofiler: "
                        "median-filtered mean image, percentile stretch; none: stretch only")
    g.add_argument("--illumination-sigma", type=float, default=50.0,
                   help="Gaussian sigma of the impa flat field (pixels)")
    g.add_argument("--stretch-percentiles", type=float, nargs=2, default=(0.05, 99.95),
                   metavar=("LOW", "HIGH"),
                   help="per-image stretch of deepprofiler/none to 0..255 (GRAPE: 0.1 99.9)")
    g.add_argument("--split", default="random_cells",
                   choices=("random_cells", "plates", "perturbations", "scaffold", "given"),
                   help="given: the split the screen's own files define (e.g. IMPA's SPLIT)")
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--holdout", action="append", default=[],
                   help="plate or perturbation held out for test (repeatable; bbbc021: impa_ood "
                        "= IMPA's unseen compounds)")
    g.add_argument("--qc-min-std", type=float, default=None, help="drop crops with a flatter channel")
    g.add_argument("--qc-min-sharpness", type=float, default=None,
                   help="drop crops whose DNA-channel Laplacian variance is lower (blur)")
    g.add_argument("--workers", type=int, default=None,
                   help="processes cropping sites (default: all cores)")
    e = p.add_argument_group("L1000 expression per perturbation (MorphDiff; data_builders/expression.py)")
    e.add_argument("--expression", metavar="FILE",
                   help="L1000 signatures (.gct, .gct.gz, .gctx, .csv/.tsv or .npy): one vector per "
                        "perturbation is written as OUT/expression.npy + expression_genes.csv")
    e.add_argument("--expression-key", default="pert_id",
                   help="signature field matched to the perturbation ids (default pert_id)")
    e.add_argument("--expression-match", default="perturbation",
                   help="perturbation-table column matched to that field (default the id)")
    e.add_argument("--landmarks", default="lm",
                   help="'lm': the file's landmark flags (pr_is_lm, 978 genes); 'all': every gene; "
                        "or a file listing genes (order kept)")
    e.add_argument("--expression-controls", default="error",
                   choices=("error", "zeros", "mean_of_controls"),
                   help="what controls without signatures get (default: an error)")
    e.add_argument("--signature-info", help="LINCS sig_info.txt (GCTX files carry ids only)")
    e.add_argument("--gene-info", help="LINCS gene_info.txt (landmark flags, symbols)")
    e.add_argument("--expression-meta", help=".npy input: CSV with one row per matrix row")
    e.add_argument("--expression-genes", help=".npy input: one gene per matrix column")


def _add_real_builders(datasets) -> None:
    from data_builders import registry

    for name in registry.REAL_BUILDERS:
        module = registry.get_builder(name)
        p = datasets.add_parser(name, help=module.SUMMARY,
                                description=f"{module.SUMMARY}. Needs: {module.NEEDS}. "
                                            f"Layout: see `{module.__name__}` docstring.")
        p.add_argument("--raw", required=True, help="the screen's root directory")
        p.add_argument("--out", required=True, help="output dataset directory")
        p.add_argument("--seed", type=int, default=0, help="seed of the splits")
        _add_builder_args(p)
        p.set_defaults(**{_BUILDER_OPTIONS[k]: v for k, v in module.DEFAULTS.items()})
        module.add_arguments(p.add_argument_group(f"{name} layout"))


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (run the same command on every host)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
    g.add_argument("--num-processes", type=int, help="number of hosts/processes")
    g.add_argument("--process-id", type=int, help="this process's index")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-host run, detecting the cluster (SLURM, Cloud TPU) automatically")


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="morphjax", description="Predict and profile how cells change under perturbations.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    train = verbs.add_parser(
        "train", help="train a model from a config; re-run the same command to resume",
        description="Train from a config. Re-running the same command on the same workdir resumes "
                    "from the newest checkpoint.")
    _add_config_args(train)
    train.add_argument("--dry-run", action="store_true",
                       help="build model and mesh, print parameters per module and per-device memory, exit")
    _add_distributed_args(train)

    build = verbs.add_parser(
        "build", help="build a dataset: the synthetic screen, a raw screen, or a public screen",
        description="Build a TFDS ArrayRecord dataset of single-cell crops. `synthetic_screen` "
                    "first renders a procedural screen in the raw layout (data_builders/RAW_LAYOUT.md); "
                    "the others read a screen in its published layout (`morphjax build --list`).")
    build.add_argument("--list", action="store_true",
                       help="print the builders and what each needs on disk, then exit")
    datasets = build.add_subparsers(dest="dataset", metavar="DATASET")
    synthetic = datasets.add_parser(
        "synthetic_screen", help="render a synthetic screen, then build it",
        description="Render a procedural Cell Painting screen with known ground truth into OUT/raw, "
                    "then build single-cell crops into OUT/dataset.")
    synthetic.add_argument("--preset", required=True,
                           help="bbbc021_like, cellpainting_like, rxrx1_like, ops_like or multi_cell_line")
    synthetic.add_argument("--scale", default="small", choices=("tiny", "small", "full"),
                           help="tiny: seconds (tests); small: minutes (demo); full: realistic size")
    synthetic.add_argument("--out", required=True, help="output directory")
    synthetic.add_argument("--seed", type=int, default=0, help="same seed, same screen")
    synthetic.add_argument("--shared-data", default=None,
                           help="directory of the compound/gene tables (bbbc021/, jump_target/, "
                                "jump_moa/); default $MORPHJAX_SHARED_DATA or ../shared/data")
    _add_builder_args(synthetic)
    raw = datasets.add_parser(
        "raw_screen", help="build single-cell crops from a raw screen on disk",
        description="Illumination-correct, crop around nuclei, filter, split and write ArrayRecord. "
                    "The raw layout is described in data_builders/RAW_LAYOUT.md.")
    raw.add_argument("--raw", required=True, help="raw screen directory (screen.json, index.csv, ...)")
    raw.add_argument("--out", required=True, help="output dataset directory")
    raw.add_argument("--seed", type=int, default=0, help="seed of the splits")
    _add_builder_args(raw)
    if list(argv[:1]) == ["build"]:  # Importing the builders is only worth it for `build`.
        _add_real_builders(datasets)

    evaluate = verbs.add_parser(
        "evaluate", help="metrics on two image sets, two embedding tables, or a profile table",
        description="Compute a named metric set and write OUT/metrics.json plus a printed table. "
                    "Each value is labelled with the feature space it was computed in.")
    evaluate.add_argument("--workdir", help="an IMPA/GRAPE run: evaluate it on its test split "
                          "(FID/KID/coverage vs the controls baseline, MoA accuracy, ...)")
    evaluate.add_argument("--spaces", default="classical",
                          help="with --workdir: feature spaces, comma-separated (classical, inception)")
    evaluate.add_argument("--samples", type=int, help="with --workdir: cells per perturbation")
    evaluate.add_argument("--real", help="real images (N,H,W,C) or embeddings (N,D): .npy/.npz")
    evaluate.add_argument("--fake", help="generated images or embeddings, same kind as --real")
    evaluate.add_argument("--metrics", default="fid,kid,prdc",
                          help="comma-separated subset of fid,kid,is,mmd,prdc")
    evaluate.add_argument("--features", default="inception", choices=("inception", "model"),
                          help="feature space for images: FID Inception, or a trained morphjax model")
    evaluate.add_argument("--weights", help="FID Inception weights (.pth or converted .npz)")
    evaluate.add_argument("--rgb", default="first3", choices=("first3", "weights"),
                          help="how >3-channel images become RGB for Inception: first three "
                               "channels (IMPA) or MorphDiff's channel weights")
    evaluate.add_argument("--checkpoint", help="morphjax train workdir whose model embeds the images")
    evaluate.add_argument("--model", help="which model of that run (if it has several)")
    evaluate.add_argument("--profiles", help="profile table (.csv/.parquet): Metadata_* columns + features")
    evaluate.add_argument("--sameby", default="Metadata_Perturbation",
                          help="profiles sharing this column are positives (replicate retrieval)")
    evaluate.add_argument("--match", metavar="COLUMN",
                          help="with --profiles: the Cell Painting CNN paper's biological matching "
                               "on treatment-level profiles by this annotation (e.g. "
                               "Metadata_MoA): interpolated MAP, folds of enrichment, "
                               "precision@k, copairs mAP")
    evaluate.add_argument("--sep", default="|", help="with --match: separator of multiple annotations")
    evaluate.add_argument("--control-column", default="Metadata_is_control",
                          help="with --match: 0/1 column of control profiles (left out)")
    evaluate.add_argument("--null-size", type=int, default=10000)
    evaluate.add_argument("--threshold", type=float, default=0.05)
    evaluate.add_argument("--k", type=int, default=5, help="neighbours for precision/recall/density/coverage")
    evaluate.add_argument("--batch-size", type=int, default=50)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", required=True, help="output directory")

    prof = verbs.add_parser(
        "profile", help="cells -> site/well/treatment profiles with sphering (Cell Painting CNN)",
        description="Aggregate a per-cell table (or a DeepProfiler npz tree <plate>/<well>/"
                    "<site>.npz) into site (median), well (mean), sphered well and treatment "
                    "(mean) profiles. Writes OUT/{well,well_sphered,treatment}.{parquet,csv}, "
                    "OUT/sphering.npz and OUT/profile_report.json.")
    prof.add_argument("--cells", required=True, metavar="TABLE_OR_NPZ_ROOT",
                      help="per-cell .parquet/.csv table, or the root of DeepProfiler npz files")
    prof.add_argument("--out", required=True, help="output directory")
    prof.add_argument("--treatment", default="Metadata_Perturbation",
                      help="column naming each well's treatment")
    prof.add_argument("--control-column", default="Metadata_is_control",
                      help="0/1 column marking negative-control cells/wells (sphering is fitted "
                           "on them)")
    prof.add_argument("--lambda", dest="lam", type=float, default=1e-2,
                      help="sphering regulariser (paper: 1e-2; see --convention)")
    prof.add_argument("--method", default="zca", type=str.lower,
                      choices=("zca", "pca", "zca-cor", "pca-cor"), help="sphering method")
    prof.add_argument("--convention", default="deepprofiler", type=str.lower,
                      choices=("deepprofiler", "pycytominer"),
                      help="deepprofiler: lambda added to covariance eigenvalues (paper); "
                           "pycytominer: added to singular values (Spherize epsilon)")
    prof.add_argument("--standardize-plates", action="store_true",
                      help="standardise wells per plate on that plate's controls before sphering")
    prof.add_argument("--sweep", action="store_true",
                      help="also sweep lambda 1e-6..1e1: OUT/lambda_sweep.csv and .png "
                           "(paper Fig. 6B)")
    prof.add_argument("--label", default="Metadata_MoA",
                      help="with --sweep: annotation column for biological matching")

    sample = verbs.add_parser(
        "sample", help="IMPA/GRAPE/MorphDiff: cells under a perturbation; PNG grid + arrays",
        description="Writes OUT/<perturbation>.png (rows: control | generated | real treated) and "
                    "OUT/<perturbation>.npz (uint8 arrays). Unseen perturbations are predicted "
                    "from their embeddings (IMPA/GRAPE) or expression vectors (MorphDiff). "
                    "MorphDiff runs: --mode g2i generates from noise (DDIM), --mode i2i edits "
                    "control cells (SDEdit at --strength); files are named <perturbation>_<mode> "
                    "and include an RGB composite (<name>_rgb.png, morphdiff.txt weights).")
    sample.add_argument("--workdir", required=True, help="a trained IMPA/GRAPE/MorphDiff run")
    sample.add_argument("--perturbation", required=True,
                        help="perturbation name (batch-correction runs: batch name or id)")
    sample.add_argument("--n", type=int, default=16, help="cells to transform")
    sample.add_argument("--from-controls", action=argparse.BooleanOptionalAction, default=True,
                        help="start from test-split control cells (default) or from any test cell")
    sample.add_argument("--interpolate-to", metavar="PERTURBATION",
                        help="also write a style-space interpolation towards this perturbation")
    sample.add_argument("--steps", type=int, default=None,
                        help="IMPA: interpolation steps (default 8); MorphDiff: DDIM steps "
                             "(default the config's: 100 for g2i, 50 for i2i)")
    sample.add_argument("--mode", choices=("g2i", "i2i"), default="g2i",
                        help="MorphDiff: gene-to-image from noise, or image-to-image from controls")
    sample.add_argument("--strength", type=float, default=None,
                        help="MorphDiff i2i: SDEdit strength in [0, 1] (default 0.55)")
    sample.add_argument("--guidance", type=float, default=None,
                        help="MorphDiff: classifier-free guidance scale (default the config's, 1: "
                             "none); needs a run trained with loss.cond_drop_prob > 0")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", help="output directory (default WORKDIR/samples_cli)")

    embed = verbs.add_parser(
        "embed", help="single-cell CNN features of a screen (Cell Painting CNN runs); "
                      "style spaces and learned tables (IMPA/GRAPE runs)",
        description="Cell Painting CNN run: every cell of the dataset through the trained "
                    "EfficientNet up to --layer, mean-pooled, written as DeepProfiler npz files "
                    "(OUT/<plate>/<well>/<site>.npz) and OUT/cells.parquet with Metadata_ columns. "
                    "IMPA/GRAPE run: perturbation_styles (mean style vector over noise draws) "
                    "and any learned gene/domain table, as Parquet with Metadata_ columns.")
    embed.add_argument("--workdir", required=True)
    embed.add_argument("--out", help="output directory (default WORKDIR/embeddings)")
    embed.add_argument("--layer", help="CNN: feature layer (default the config's, "
                                       "block6a_activation)")
    embed.add_argument("--splits", help="CNN: comma-separated dataset splits (default the "
                                        "config's data.splits)")
    embed.add_argument("--batch-size", type=int, help="CNN: cells per batch (default 256)")
    embed.add_argument("--random-init", action="store_true",
                       help="CNN: use an untrained network of the same architecture (baseline)")
    embed.add_argument("--noise-draws", type=int, default=20, help="IMPA: noise draws")
    embed.add_argument("--seed", type=int, default=0, help="IMPA: seed of the noise draws")

    demo = verbs.add_parser(
        "demo", help="the main job: synthetic screen -> IMPA -> metrics and image grids",
        description="Builds the small synthetic screen if absent, trains IMPA (configs/impa.py:"
                    "synthetic), evaluates it and writes sample grids. Re-running resumes/reuses.")
    demo.add_argument("--workdir", default="runs/demo")
    demo.add_argument("--data", default="runs/data/bbbc021_like_small",
                      help="where the synthetic screen is (or will be) built")
    demo.add_argument("--steps", type=int, help="override train.total_steps")
    demo.add_argument("--preset", default="synthetic", help="preset of configs/impa.py")
    demo.add_argument("--scale", default="small", choices=("tiny", "small", "full"))
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    bench = verbs.add_parser("bench", help="benchmarks that print side-by-side timings")
    suites = bench.add_subparsers(dest="suite", required=True, metavar="SUITE")
    bench_metrics = suites.add_parser(
        "metrics", help="FID, KID, density/coverage and mAP: morphjax vs SciPy/NumPy, prdc, copairs")
    bench_metrics.add_argument("--fid-sizes", default="10000,50000", help="sample counts for FID/KID")
    bench_metrics.add_argument("--map-sizes", default="5000,20000", help="profile counts for mAP")
    bench_metrics.add_argument("--dim", type=int, default=2048)
    bench_metrics.add_argument("--repeats", type=int, default=1)
    bench_metrics.add_argument("--out", help="also write the table as CSV")
    bench_features = suites.add_parser(
        "features", help="classical cell features: morphjax (jit, batched) vs scikit-image per crop")
    bench_features.add_argument("--n", type=int, default=1024, help="synthetic-screen crops")
    bench_features.add_argument("--size", type=int, default=96, help="crop side in pixels")
    bench_features.add_argument("--channels", type=int, default=3, choices=(3, 5),
                                help="3: bbbc021_like (DNA, Tubulin, Actin); 5: cellpainting_like")
    bench_features.add_argument("--batch-size", type=int, default=256)
    bench_features.add_argument("--reference-n", type=int,
                                help="crops timed with scikit-image (default --n), scaled to --n")
    bench_features.add_argument("--repeats", type=int, default=1)
    bench_features.add_argument("--out", help="also write the table as CSV")
    bench_impa = suites.add_parser(
        "impa", help="IMPA train-step images/s at the paper config; vs the PyTorch reference",
        description="Times the IMPA train step (configs/impa.py preset, random batch) on the "
                    "current devices; with --torch-reference, the public PyTorch implementation "
                    "on the same batch, side by side.")
    bench_impa.add_argument("--preset", default="bbbc021", help="configs/impa.py preset")
    bench_impa.add_argument("--batch-size", type=int, help="default: the preset's (paper: 32)")
    bench_impa.add_argument("--conditions", type=int, default=5, help="perturbations (D heads)")
    bench_impa.add_argument("--torch-reference", metavar="DIR",
                            help="root of a theislab/IMPA checkout (needs torch and munch)")
    _add_timing_args(bench_impa)

    bench_build = suites.add_parser(
        "build", help="raw-screen builder crops/s with 1 and N worker processes",
        description="Builds the same raw screen once per worker count and prints sites/s, "
                    "crops/s, the speed-up and peak memory side by side.")
    bench_build.add_argument("--raw", default=None, help="a raw screen (default: the small "
                             "bbbc021_like synthetic screen, rendered if absent)")
    bench_build.add_argument("--workers", type=int, nargs="+", default=None,
                             help="worker counts to time (default: 1 and all cores)")
    bench_build.add_argument("--crop", type=int, default=96)

    bench_cpcnn = suites.add_parser(
        "cpcnn", help="Cell Painting CNN train images/s and embedding cells/s on this device",
        description="Times the configs/cpcnn.py train step (EfficientNet-B0, 128x128x5, 490 "
                    "classes, batch 32) and the `morphjax embed` forward to block6a on random "
                    "inputs, batch sharded over every device.")
    bench_cpcnn.add_argument("--preset", default="combined", help="configs/cpcnn.py preset")
    bench_cpcnn.add_argument("--batch-size", type=int, help="train batch (default the preset's, 32)")
    bench_cpcnn.add_argument("--embed-batch-size", type=int, default=256)
    bench_cpcnn.add_argument("--image-size", type=int, help="default the preset's (128)")
    bench_cpcnn.add_argument("--classes", type=int, default=490)
    _add_timing_args(bench_cpcnn)

    bench_ldm = suites.add_parser(
        "ldm", help="MorphDiff U-Net train step and DDIM sampling images/s and memory per device",
        description="Times the MorphDiff latent-diffusion train step (U-Net + frozen expression "
                    "projection, AdamW, EMA; the config's sharding rules, FSDP when the mesh has "
                    "fsdp > 1) and DDIM sampling on random latents and expression vectors, one "
                    "row per (batch, mesh), with planned and compiled memory per device.")
    bench_ldm.add_argument("--config", default="configs/morphdiff.py:jump_orf",
                           help="configs/morphdiff.py:PRESET (paper: jump_orf, cdrp, lincs; "
                                "CPU-sized: synthetic, tiny)")
    bench_ldm.add_argument("--batch", default="8,64", help="comma-separated batch sizes")
    bench_ldm.add_argument("--mesh", action="append", default=None, metavar="data=..,fsdp=..",
                           help="repeatable; default data=-1 (all devices, data parallel)")
    bench_ldm.add_argument("--ddim-steps", type=int, default=50)
    bench_ldm.add_argument("--dtype", choices=("float32", "bfloat16"),
                           help="compute dtype (default: the config's)")
    bench_ldm.add_argument("--remat", action="store_true", help="rematerialise U-Net blocks")
    bench_ldm.add_argument("--genes", type=int, default=977, help="expression vector length")
    bench_ldm.add_argument("--plan-only", action="store_true",
                           help="shapes, shardings, planned bytes and a traced step; no compile")
    bench_ldm.add_argument("--fast-compile", action="store_true",
                           help="XLA backend optimisation off: quicker compile, slower steps")
    bench_ldm.add_argument("--steps", type=int, default=10, help="timed train steps (median)")
    bench_ldm.add_argument("--warmup", type=int, default=2)
    bench_ldm.add_argument("--set", dest="overrides", action="append", default=[],
                           metavar="KEY=VALUE", help="config override, e.g. unet.num_heads=4")
    bench_ldm.add_argument("--out", metavar="DIR",
                           help="write DIR/bench_ldm.md and DIR/bench_ldm.csv")

    convert = verbs.add_parser("convert-weights", help="convert public pretrained weights")
    convert.add_argument("model", choices=("inception", "lpips_vgg16"),
                         help="inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth; "
                              "lpips_vgg16: torchvision's vgg16-397923af.pth (+ --lin vgg.pth)")
    convert.add_argument("input", help="the downloaded weights file")
    convert.add_argument("output", help="converted .npz (reads without torch)")
    convert.add_argument("--lin", help="lpips_vgg16: LPIPS's lin-head file vgg.pth")

    sweep = verbs.add_parser(
        "sweep", help="run every point of a config's get_sweep(), one run directory each",
        description="Expand get_sweep(arg) of a config file into one run directory per point under "
                    "--workdir and train them one after another. Finished points are skipped and "
                    "interrupted ones resume.")
    _add_config_args(sweep)
    sweep.add_argument("--list", action="store_true", help="print the run directories and overrides, then exit")
    return parser.parse_args(argv)


def _add_timing_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the train-step benchmarks."""
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. compute_dtype=bfloat16")
    p.add_argument("--out", help="also write the table as CSV")


def _init_runtime(args) -> None:
    # Grain worker processes read absl flags; parse them once outside absl.app.run.
    from absl import flags
    flags.FLAGS(sys.argv[:1], known_only=True)
    from morphjax import parallel
    parallel.initialize_distributed(getattr(args, "coordinator", None),
                                    getattr(args, "num_processes", None),
                                    getattr(args, "process_id", None),
                                    auto=getattr(args, "distributed", False))


def run_name(point: dict) -> str:
    """Directory name for one sweep point, e.g. `learning_rate=0.01,batch_size=64`."""
    name = ",".join(f"{key.split('.')[-1]}={value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name) or "default"


def _train(args) -> int:
    from morphjax import config as cfg
    from morphjax.train import loop

    config = cfg.load_config(args.config, args.overrides)
    if args.dry_run:
        print(loop.describe(config))
        return 0
    result = loop.train(config, args.workdir)
    print(f"done: step {result.step}, workdir {os.path.abspath(args.workdir)}")
    return 0


def _sweep(args) -> int:
    from morphjax import config as cfg
    from morphjax.train import loop

    points = cfg.load_sweep(args.config)
    configs = []
    for point in points:  # Resolve every point before training any, so a typo fails fast.
        config = cfg.load_config(args.config, args.overrides)
        cfg.apply_overrides(config, point)
        cfg.validate(config, *_device_counts())
        configs.append((os.path.join(args.workdir, run_name(point)), point, config))
    for workdir, point, _ in configs:
        print(f"{workdir}  {point}")
    if args.list:
        return 0
    for i, (workdir, point, config) in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}] {workdir}")
        loop.train(config, workdir)
    return 0


def _build(args) -> int:
    from data_builders.raw_screen import build_raw_screen

    if args.list or args.dataset is None:
        from data_builders import registry

        rows = registry.builder_table()
        width = max(len(r[0]) for r in rows)
        print(f"{'builder':<{width}}  what it reads, and what it needs on disk")
        for name, summary, needs in rows:
            print(f"{name:<{width}}  {summary}\n{'':<{width}}    needs: {needs}")
        print("usage: morphjax build BUILDER --raw DIR --out DIR [options]; "
              "morphjax build BUILDER --help")
        return 0 if args.list else 2
    options = dict(crop_size=args.crop, resize_to=args.resize, illumination=args.illumination,
                   illumination_sigma=args.illumination_sigma,
                   stretch_percentiles=tuple(args.stretch_percentiles), split=args.split,
                   test_fraction=args.test_fraction, holdout=tuple(args.holdout), seed=args.seed,
                   workers=args.workers)
    if args.qc_min_std is not None:
        options["qc_min_std"] = args.qc_min_std
    if args.qc_min_sharpness is not None:
        options["qc_min_sharpness"] = args.qc_min_sharpness
    if args.dataset == "synthetic_screen":
        from data_builders.synthetic_screen import simulate_screen

        raw_dir, out_dir = os.path.join(args.out, "raw"), os.path.join(args.out, "dataset")
        summary = simulate_screen(args.preset, args.scale, raw_dir, seed=args.seed,
                                  shared_data=args.shared_data)
        print(f"raw screen: {raw_dir}  " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    elif args.dataset == "raw_screen":
        raw_dir, out_dir = args.raw, args.out
    else:
        from data_builders import registry

        module = registry.get_builder(args.dataset)
        named = getattr(module, "HOLDOUTS", {})  # e.g. bbbc021's impa_ood
        options["holdout"] = tuple(h for name in args.holdout for h in named.get(name, (name,)))
        raw_dir, out_dir = module.read(args.raw, args), args.out
    expression = None
    if args.expression:  # Paired before the build: a missing perturbation fails fast.
        from data_builders.raw_screen import layout

        if not isinstance(raw_dir, layout.RawScreen):
            raw_dir = layout.read_screen(raw_dir)
        expression = _pair_expression(raw_dir.perturbations, args)
    report = build_raw_screen(raw_dir, out_dir, **options)
    if args.dataset not in ("synthetic_screen", "raw_screen"):
        finish = getattr(module, "finish", None)
        if finish is not None:  # Builder-specific outputs, e.g. GRAPE's z-score statistics.
            finish(out_dir, raw_dir)
    if expression is not None:
        from data_builders import expression as ex

        paths = ex.write_expression(out_dir, *expression)
        print(f"expression: {paths['expression']} {expression[0].shape}")
    cells = report["cells"]
    print(f"dataset: {out_dir} ({report['sites']} sites, channels {', '.join(report['channels'])})")
    print("cells: " + ", ".join(f"{k} {v}" for k, v in cells.items()))
    print("examples: " + ", ".join(f"{k} {v}" for k, v in report["examples"].items())
          + " | perturbations: "
          + ", ".join(f"{k} {v}" for k, v in report["perturbations_per_split"].items()))
    print(f"full report: {os.path.join(out_dir, 'build_report.json')}")
    return 0


def _pair_expression(perturbations, args):
    """(matrix, genes) of --expression for the screen's perturbations."""
    from data_builders import expression as ex

    path = args.expression
    if path.lower().endswith(".gctx"):
        sig = ex.read_gctx(path, pert_ids=perturbations[args.expression_match].tolist()
                           if args.expression_key == "pert_id" else None,
                           signature_info=args.signature_info, gene_info=args.gene_info)
    else:
        kwargs = {}
        if path.lower().endswith(".npy"):
            kwargs = dict(meta=args.expression_meta, genes=args.expression_genes)
        sig = ex.read_signatures(path, **kwargs)
        if args.signature_info or args.gene_info:
            sig = ex.add_metadata(sig, signature_info=args.signature_info,
                                  gene_info=args.gene_info)
    if args.landmarks != "all":
        sig = ex.select_landmarks(sig, landmarks=None if args.landmarks == "lm"
                                  else args.landmarks, n_expected=None)
    matrix, _ = ex.pair_expression(perturbations, sig, key=args.expression_key,
                                   perturbation_column=args.expression_match,
                                   controls=args.expression_controls)
    return matrix, sig.genes


def _evaluate(args) -> int:
    if args.workdir:
        from morphjax import impa_eval
        spaces = tuple(x for x in args.spaces.split(",") if x)
        result = impa_eval.evaluate_run(args.workdir, args.out, spaces=spaces,
                                        inception_weights=args.weights,
                                        samples_per_perturbation=args.samples, seed=args.seed)
        print(f"written: {os.path.join(args.out, 'metrics.json')} (step {result['run']['step']})")
        return 0
    from morphjax import evaluate
    return evaluate.run(args)


def _profile(args) -> int:
    from morphjax import profiling

    if os.path.isdir(args.cells):
        cells = profiling.read_site_features(args.cells)
    else:
        cells = profiling.read_table(args.cells)
    result = profiling.profile(cells, treatment=args.treatment,
                               control_column=args.control_column, lam=args.lam,
                               method=args.method, convention=args.convention,
                               standardize_plates=args.standardize_plates)
    paths = profiling.write_profiles(result, args.out)
    r = result["report"]
    print(f"{r['cells']} cells -> {r['sites']} sites -> {r['wells']} wells ({r['control_wells']} "
          f"control) on {r['plates']} plates -> {r['treatments']} treatments; "
          f"{r['dropped_nonfinite_cells']} cells dropped (NaN/inf)")
    print(f"sphering: {r['method']}, lambda {r['lambda']:g} ({r['convention']}), fitted on "
          f"{result['sphering'].n_controls} control wells")
    if args.sweep:
        table = profiling.lambda_sweep(result["well"], label=args.label, treatment=args.treatment,
                                       control_column=args.control_column, method=args.method,
                                       convention=args.convention,
                                       standardize_plates=args.standardize_plates)
        paths["lambda_sweep.csv"] = profiling.write_table(
            table, os.path.join(args.out, "lambda_sweep.csv"))
        paths["lambda_sweep.png"] = profiling.plot_lambda_sweep(
            table, os.path.join(args.out, "lambda_sweep.png"))
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"written: {os.path.abspath(args.out)} ({', '.join(sorted(paths))})")
    return 0


def _sample(args) -> int:
    from morphjax import predict
    from morphjax.runs import load_run, read_config
    out = args.out or os.path.join(args.workdir, "samples_cli")
    task = read_config(args.workdir).task
    if task == "morphdiff_ldm":
        from morphjax import morphdiff_sample
        run = morphdiff_sample.load(args.workdir, args.guidance)
        paths = morphdiff_sample.sample(run, args.perturbation, out, mode=args.mode, n=args.n,
                                        strength=args.strength, steps=args.steps, seed=args.seed)
    else:
        if args.guidance is not None:
            raise SystemExit(f"--guidance applies to MorphDiff runs; {args.workdir} is a "
                             f"{task!r} run")
        run = load_run(args.workdir)
        paths = predict.sample(run, args.perturbation, out, n=args.n,
                               from_controls=args.from_controls,
                               interpolate_to=args.interpolate_to, steps=args.steps or 8,
                               seed=args.seed)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _embed(args) -> int:
    from morphjax.runs import load_run
    run = load_run(args.workdir)
    out = args.out or os.path.join(args.workdir, "embeddings")
    if run.config.task == "cpcnn":
        from morphjax.embed import embed_run
        splits = tuple(x for x in (args.splits or "").split(",") if x) or None
        report = embed_run(run, out, layer=args.layer, splits=splits,
                           batch_size=args.batch_size, random_init=args.random_init)
        rate = report["cells_per_s"]
        print(f"{report['cells']} cells x {report['dim']} features ({report['layer']}) in "
              f"{report['sites']} site files; "
              + (f"{rate:.1f} cells/s" if rate else "one batch (no rate after compilation)"))
        print(f"cells: {report['table']}")
        return 0
    from morphjax import predict
    paths = predict.embed(run, out, n_noise=args.noise_draws, seed=args.seed)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _demo(args) -> int:
    from morphjax.demo import run_demo
    run_demo(args.workdir, args.data, steps=args.steps, preset=args.preset, scale=args.scale,
             overrides=tuple(args.overrides))
    return 0


def _bench(args) -> int:
    from morphjax.benchmarks import bench_features, bench_metrics

    if args.suite == "build":
        from morphjax.bench_build import bench_build
        workers = args.workers or sorted({1, os.cpu_count() or 1})
        bench_build(args.raw, workers=workers, crop_size=args.crop)
        return 0
    sizes = lambda text: tuple(int(x) for x in text.split(",") if x)  # noqa: E731
    if args.suite == "cpcnn":
        from morphjax.bench_cpcnn import bench_cpcnn
        table = bench_cpcnn(args.preset, batch_size=args.batch_size,
                            embed_batch_size=args.embed_batch_size, image_size=args.image_size,
                            num_classes=args.classes, steps=args.steps, warmup=args.warmup,
                            overrides=tuple(args.overrides))
    elif args.suite == "ldm":
        from morphjax.bench_ldm import FAST_COMPILE, bench_ldm
        bench_ldm(args.config, batches=sizes(args.batch), meshes=args.mesh or ("data=-1",),
                  steps=args.steps, warmup=args.warmup, ddim_steps=args.ddim_steps,
                  dtype=args.dtype, remat=args.remat, num_genes=args.genes,
                  overrides=tuple(args.overrides), plan_only=args.plan_only,
                  compiler_options=FAST_COMPILE if args.fast_compile else None, out=args.out)
        return 0
    elif args.suite == "impa":
        from morphjax.bench_impa import bench_impa
        table = bench_impa(args.preset, batch_size=args.batch_size, steps=args.steps,
                           warmup=args.warmup, num_domains=args.conditions,
                           overrides=tuple(args.overrides), torch_reference=args.torch_reference)
    elif args.suite == "features":
        table = bench_features(args.n, args.size, args.channels, args.repeats, args.batch_size,
                               args.reference_n)
    else:
        table = bench_metrics(sizes(args.fid_sizes), sizes(args.map_sizes), args.dim,
                              args.repeats)
    if args.out:
        table.to_csv(args.out, index=False)
    return 0


def _convert_weights(args) -> int:
    from morphjax.features import convert
    if args.model == "lpips_vgg16":
        if not args.lin:
            print("morphjax convert-weights lpips_vgg16: --lin vgg.pth (LPIPS's heads) is "
                  "required", file=sys.stderr)
            return 2
        print(f"written: {convert.convert_lpips_vgg16(args.input, args.lin, args.output)}")
        return 0
    print(f"written: {convert.convert_inception(args.input, args.output)}")
    return 0


def _device_counts() -> tuple[int, int]:
    import jax
    return jax.device_count(), jax.process_count()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    _init_runtime(args)
    from morphjax.config import ConfigError
    try:
        verbs = {"train": _train, "sweep": _sweep, "build": _build, "evaluate": _evaluate,
                 "bench": _bench, "convert-weights": _convert_weights, "sample": _sample,
                 "embed": _embed, "demo": _demo, "profile": _profile}
        return verbs[args.verb](args)
    except ConfigError as e:
        print(f"morphjax {args.verb}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
