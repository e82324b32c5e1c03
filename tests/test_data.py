"""Behaviour tests for morphjax.data: sources, samplers, augmentation, pipelines, shapes."""

import itertools

import grain
import numpy as np
import pytest
import scipy.stats
import tensorflow_datasets as tfds

from morphjax import data


def _take(dataset, n):
    return list(itertools.islice(iter(dataset), n))


def _index_source(n):
    return data.ArraySource({"idx": np.arange(n, dtype=np.int64)})


def _flat_idx(batches):
    return np.concatenate([b["idx"] for b in batches])


# ---------------------------------------------------------------- sources


def test_array_source_items_and_length_mismatch_names_key():
    src = data.ArraySource({"image": np.arange(12).reshape(4, 3), "label": np.arange(4)})
    assert len(src) == 4
    np.testing.assert_array_equal(src[2]["image"], [6, 7, 8])
    assert src[2]["label"] == 2
    with pytest.raises(ValueError, match="'label'.*3 examples"):
        data.ArraySource({"image": np.zeros((4, 2)), "label": np.zeros(3)})
    with pytest.raises(IndexError):
        src[4]


# ---------------------------------------------------------------- train pipeline


def test_train_dataset_seeded_epochs_are_permutations_and_reshuffled():
    n, bs = 48, 8
    per_epoch = n // bs
    batches = _take(data.make_train_dataset(_index_source(n), batch_size=bs, seed=0), 3 * per_epoch)
    again = _take(data.make_train_dataset(_index_source(n), batch_size=bs, seed=0), 3 * per_epoch)
    other = _take(data.make_train_dataset(_index_source(n), batch_size=bs, seed=1), 3 * per_epoch)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a["idx"], b["idx"])
    order = _flat_idx(batches).reshape(3, n)
    other_order = _flat_idx(other).reshape(3, n)
    for epoch in range(3):
        np.testing.assert_array_equal(np.sort(order[epoch]), np.arange(n))  # each example once
    assert not np.array_equal(order[0], order[1])
    assert not np.array_equal(order[1], order[2])
    assert not np.array_equal(order[0], other_order[0])
    # grain reseeds epoch e with seed + e; derived seeds keep runs with seeds 0 and 1 apart.
    assert not np.array_equal(order[1], other_order[0])


def test_train_dataset_processes_split_the_global_order():
    n = 48
    single = data.make_train_dataset(_index_source(n), batch_size=4, seed=3)
    global_order = _flat_idx(_take(single, 2 * n // 4))
    seen = []
    for process in range(2):
        ds = data.make_train_dataset(
            _index_source(n), batch_size=4, seed=3, process_index=process, process_count=2
        )
        local = _flat_idx(_take(ds, 2 * n // 8))  # two epochs' worth of this process's share
        np.testing.assert_array_equal(local, global_order[process::2])
        seen.append(local[: n // 2])
    assert not set(seen[0]) & set(seen[1])
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


def test_train_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="needs labels"):
        data.make_train_dataset(_index_source(8), batch_size=2, seed=0, balance_classes=True)
    with pytest.raises(ValueError, match="labels has 7 entries"):
        data.make_train_dataset(_index_source(8), batch_size=2, seed=0, labels=np.zeros(7))
    with pytest.raises(ValueError, match="process_index"):
        data.make_train_dataset(
            _index_source(8), batch_size=2, seed=0, process_index=2, process_count=2)


def _augmented_source(n=40):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 8, 8, 2), dtype=np.uint8)
    return data.ArraySource({"image": images, "idx": np.arange(n)}), images


_AUGMENT = dict(crop_prob=0.5, brightness=0.1, contrast=0.2)


def _assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in g:
            np.testing.assert_array_equal(g[key], w[key])


def test_train_iterator_checkpoint_resume_reproduces_batches_and_augmentations():
    source, images = _augmented_source()

    def build():
        return data.make_train_dataset(
            source, batch_size=4, seed=5, transform=data.make_augment(_AUGMENT))

    reference = _take(build(), 14)  # crosses an epoch boundary (10 batches per epoch)
    it = iter(build())
    _assert_batches_equal([next(it) for _ in range(7)], reference[:7])
    state = it.get_state()
    resumed = iter(build())
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(7)], reference[7:])
    # The augmentation really ran: outputs are float in [0, 1] and differ from the inputs.
    first = reference[0]
    assert first["image"].dtype == np.float32
    assert 0.0 <= first["image"].min() and first["image"].max() <= 1.0
    assert not np.allclose(first["image"], images[first["idx"]] / 255.0)


def test_augmentations_do_not_depend_on_process_layout():
    source, _ = _augmented_source()
    augment = data.make_augment(_AUGMENT)
    single = data.make_train_dataset(source, batch_size=4, seed=5, transform=augment)
    global_images = np.concatenate([b["image"] for b in _take(single, 10)])
    for process in range(2):
        ds = data.make_train_dataset(
            source, batch_size=4, seed=5, transform=augment, process_index=process, process_count=2
        )
        local = np.concatenate([b["image"] for b in _take(ds, 5)])
        np.testing.assert_array_equal(local, global_images[process::2])


def test_train_iterator_checkpoint_resume_with_worker_process():
    source, _ = _augmented_source()

    def build(num_workers):
        return data.make_train_dataset(
            source, batch_size=4, seed=5, transform=data.make_augment(_AUGMENT),
            num_workers=num_workers)

    reference = _take(build(0), 8)
    it = iter(build(1))
    _assert_batches_equal([next(it) for _ in range(4)], reference[:4])
    state = it.get_state()
    del it
    resumed = iter(build(1))
    resumed.set_state(state)
    _assert_batches_equal([next(resumed) for _ in range(4)], reference[4:])


# ---------------------------------------------------------------- class-balanced sampler


_COUNTS = (3, 5, 8, 12, 20)  # median 8


def _labels():
    return np.repeat(np.arange(len(_COUNTS)), _COUNTS)


def test_balanced_epoch_draws_median_per_class():
    labels = _labels()
    per_class = int(np.median(_COUNTS))
    epoch0 = data.balanced_epoch_indices(labels, seed=0, epoch=0)
    epoch1 = data.balanced_epoch_indices(labels, seed=0, epoch=1)
    np.testing.assert_array_equal(epoch0, data.balanced_epoch_indices(labels, seed=0, epoch=0))
    assert not np.array_equal(epoch0, epoch1)
    for epoch in (epoch0, epoch1):
        np.testing.assert_array_equal(np.bincount(labels[epoch]), [per_class] * len(_COUNTS))
        big = epoch[labels[epoch] == 4]
        assert len(np.unique(big)) == per_class  # no duplicates when the class has enough cells
        median_class = epoch[labels[epoch] == 2]
        np.testing.assert_array_equal(np.sort(median_class), np.flatnonzero(labels == 2))
        small = epoch[labels[epoch] == 0]
        assert set(small) <= set(np.flatnonzero(labels == 0))  # oversampled from its own pool
    # Every epoch resamples the big class: over epochs more than `per_class` of its cells appear.
    big_cells = set()
    for e in range(10):
        idx = data.balanced_epoch_indices(labels, seed=0, epoch=e)
        big_cells |= set(idx[labels[idx] == 4])
    assert len(big_cells) > 15
    # Even number of classes: the median is rounded down.
    even = np.repeat(np.arange(4), (2, 4, 7, 10))
    assert np.all(np.bincount(even[data.balanced_epoch_indices(even, seed=1, epoch=0)]) == 5)


def test_class_balanced_dataset_matches_epoch_tables_and_pipeline():
    labels = _labels()
    source = data.ArraySource({"idx": np.arange(len(labels)), "label": labels})
    ds = data.class_balanced(grain.MapDataset.source(source), labels, seed=4)
    assert ds.epoch_length == 40
    for epoch in (0, 3):
        items = [ds[epoch * 40 + i]["idx"] for i in range(40)]
        want = data.balanced_epoch_indices(labels, seed=4, epoch=epoch)
        np.testing.assert_array_equal(items, want)
    train = data.make_train_dataset(
        source, batch_size=8, seed=4, labels=labels, balance_classes=True)
    batches = _take(train, 10)
    for epoch in range(2):
        epoch_labels = np.concatenate([b["label"] for b in batches[5 * epoch : 5 * epoch + 5]])
        np.testing.assert_array_equal(np.bincount(epoch_labels), [8] * 5)
    with pytest.raises(ValueError, match="labels has 10 entries"):
        data.class_balanced(grain.MapDataset.source(source), np.zeros(10), seed=0)


# ---------------------------------------------------------------- control/treated pairs


def _pair_source():
    pert = np.repeat([0, 1, 2, 3], [30, 60, 20, 10])
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pert))  # interleave controls and treated
    pert = pert[order]
    source = data.ArraySource({"idx": np.arange(len(pert)), "pert": pert})
    return source, pert == 0, pert


def _draws(ds, epochs):
    n = ds.epoch_length
    return [ds[i] for i in range(epochs * n)]


def test_control_treated_pairs_epochs_and_frequencies():
    source, is_control, pert = _pair_source()
    parent = grain.MapDataset.source(source)
    ds = data.control_treated_pairs(parent, is_control, pert, seed=0)
    assert ds.epoch_length == 30
    items = _draws(ds, 200)
    controls = np.array([it["control"]["idx"] for it in items]).reshape(200, 30)
    for epoch in controls[:3]:
        np.testing.assert_array_equal(np.sort(epoch), np.flatnonzero(is_control))
    assert not np.array_equal(controls[0], controls[1])
    treated_pert = np.array([it["treated"]["pert"] for it in items])
    assert np.all(treated_pert != 0)
    assert np.all(~is_control[[it["treated"]["idx"] for it in items]])

    balanced = data.control_treated_pairs(
        parent, is_control, pert, seed=0, balance_perturbations=True)
    balanced_pert = np.array([it["treated"]["pert"] for it in _draws(balanced, 200)])
    assert np.all(balanced_pert != 0)

    by_images = np.array([60, 20, 10]) / 90
    uniform = np.full(3, 1 / 3)
    critical = scipy.stats.chi2.ppf(0.999, df=2)

    def chi2(draws, p):
        observed = np.bincount(draws, minlength=4)[1:]
        return scipy.stats.chisquare(observed, p * len(draws)).statistic

    assert chi2(treated_pert, by_images) < critical
    assert chi2(treated_pert, uniform) > 10 * critical
    assert chi2(balanced_pert, uniform) < critical
    assert chi2(balanced_pert, by_images) > 10 * critical


def test_control_treated_pairs_errors_and_pipeline():
    source, is_control, pert = _pair_source()
    parent = grain.MapDataset.source(source)
    with pytest.raises(ValueError, match="no control"):
        data.control_treated_pairs(parent, np.zeros(len(pert), bool), pert, seed=0)
    with pytest.raises(ValueError, match="no treated"):
        data.control_treated_pairs(parent, np.ones(len(pert), bool), pert, seed=0)
    with pytest.raises(ValueError, match="perturbation has 5 entries"):
        data.control_treated_pairs(parent, is_control, pert[:5], seed=0)
    with pytest.raises(TypeError, match="boolean"):
        data.control_treated_pairs(parent, is_control.astype(int), pert, seed=0)
    pairs = data.control_treated_pairs(parent, is_control, pert, seed=2)
    batches = _take(data.make_train_dataset(pairs, batch_size=5, seed=2), 6)  # one epoch
    controls = np.concatenate([b["control"]["idx"] for b in batches])
    np.testing.assert_array_equal(np.sort(controls), np.flatnonzero(is_control))
    assert np.all(np.concatenate([b["treated"]["pert"] for b in batches]) != 0)


# ---------------------------------------------------------------- augmentation


def _dihedral(image):
    square = image.shape[0] == image.shape[1]
    ks = range(4) if square else (0, 2)
    return [np.rot90(f, k, axes=(0, 1)) for f in (image, np.flip(image, 1)) for k in ks]


@pytest.mark.parametrize("shape", [(8, 8, 3), (6, 10, 2)])
def test_augment_flips_and_rotations_are_exact_dihedral_transforms(shape):
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    candidates = _dihedral(image)
    hits = set()
    for seed in range(64):
        out = data.augment_crop(
            image, np.random.default_rng(seed), crop_prob=0, brightness=0, contrast=0)
        assert out.shape == shape and out.dtype == np.float32
        matches = [i for i, c in enumerate(candidates) if np.array_equal(out, c)]
        assert len(matches) >= 1
        hits.add(matches[0])
    assert len(hits) == len(candidates)  # every transform of the group occurs


def _bilinear_reference(image, out_h, out_w):
    """Separable pixel-centre bilinear resize with clamped edges, via np.interp."""
    h, w, c = image.shape
    ys = np.clip((np.arange(out_h) + 0.5) * h / out_h - 0.5, 0, h - 1)
    xs = np.clip((np.arange(out_w) + 0.5) * w / out_w - 0.5, 0, w - 1)
    rows = np.stack(
        [[np.interp(ys, np.arange(h), image[:, j, k]) for j in range(w)] for k in range(c)])
    rows = rows.transpose(2, 1, 0)  # (out_h, w, c)
    out = np.stack(
        [[np.interp(xs, np.arange(w), rows[i, :, k]) for i in range(out_h)] for k in range(c)])
    return out.transpose(1, 2, 0)


def test_resized_crop_matches_bilinear_reference_and_crop_keeps_shape():
    image = np.random.default_rng(1).random((20, 20, 3)).astype(np.float32)
    out = data.resized_crop(image, top=3, left=2, height=17, width=16)
    want = _bilinear_reference(image[3:20, 2:18], 20, 20)
    np.testing.assert_allclose(out, want, atol=1e-6)
    np.testing.assert_array_equal(data.resized_crop(image, 0, 0, 20, 20), image)
    uint8_image = (image * 255).astype(np.uint8)
    changed = 0
    for seed in range(10):
        out = data.augment_crop(
            uint8_image, np.random.default_rng(seed), crop_prob=1.0, crop_scale=(0.8, 0.9),
            flips=False, rot90=False, brightness=0, contrast=0,
        )
        assert out.shape == image.shape and out.dtype == np.float32
        changed += not np.allclose(out, uint8_image / 255.0)
    assert changed == 10


def test_brightness_contrast_are_per_channel_affine_and_clipped():
    rng = np.random.default_rng(2)
    image = rng.uniform(0.3, 0.7, (12, 12, 4)).astype(np.float32)
    out = data.augment_crop(
        image, np.random.default_rng(7), crop_prob=0, flips=False, rot90=False,
            brightness=0.1, contrast=0.2)
    slopes, offsets = [], []
    for k in range(4):
        x = image[..., k].ravel()
        design = np.stack([x, np.ones_like(x)], 1)
        (slope, offset), *_ = np.linalg.lstsq(design, out[..., k].ravel(), rcond=None)
        np.testing.assert_allclose(design @ [slope, offset], out[..., k].ravel(), atol=1e-5)
        assert 0.8 - 1e-6 <= slope <= 1.2 + 1e-6
        shift = out[..., k].mean() - image[..., k].mean()  # mean moves by the brightness shift only
        assert abs(shift) <= 0.1 + 1e-6
        slopes.append(slope)
        offsets.append(shift)
    assert np.ptp(slopes) > 1e-3 and np.ptp(offsets) > 1e-3  # channels get different draws
    # Contrast pivots on each channel's own mean: without brightness, channel means stay put.
    levels = rng.uniform(0.1, 0.3, (12, 12, 3)) + np.array([0.0, 0.3, 0.6])
    image = levels.astype(np.float32)
    out = data.augment_crop(
        image, np.random.default_rng(3), crop_prob=0, flips=False, rot90=False,
            brightness=0, contrast=0.2)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), image.mean(axis=(0, 1)), atol=1e-6)
    assert np.abs(out.std(axis=(0, 1)) / image.std(axis=(0, 1)) - 1).max() > 1e-3
    bright = data.augment_crop(
        np.full((6, 6, 2), 250, np.uint8), np.random.default_rng(0), brightness=0.5, contrast=0.5
    )
    assert bright.dtype == np.float32 and bright.min() >= 0.0 and bright.max() <= 1.0


def test_make_augment_config_handling():
    image = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    item = {"cells": image, "label": 3}
    off = data.make_augment({"enabled": False, "image_key": "cells"})
    out = off(item, np.random.default_rng(0))
    np.testing.assert_array_equal(out["cells"], image.astype(np.float32) / 255)
    assert out["label"] == 3
    on = data.make_augment(dict(image_key="cells", crop_prob=0, brightness=0, contrast=0))
    result = on(item, np.random.default_rng(0))["cells"]
    assert any(np.array_equal(result, c) for c in _dihedral(image / np.float32(255)))
    with pytest.raises(ValueError, match="crop_probb"):
        data.make_augment({"crop_probb": 0.5})
    with pytest.raises(ValueError, match="crop_prob"):
        data.make_augment({"crop_prob": 1.5})
    with pytest.raises(KeyError, match="'image'"):
        data.make_augment({})(item, np.random.default_rng(0))


# ---------------------------------------------------------------- eval pipeline


@pytest.mark.parametrize(
    "n,batch_size,process_count", [(23, 4, 2), (23, 5, 1), (1, 3, 2), (8, 4, 2)])
def test_eval_dataset_covers_each_example_once_with_padding(n, batch_size, process_count):
    seen = []
    num_batches = set()
    for process in range(process_count):
        batches = list(
            data.make_eval_dataset(
                _index_source(n), batch_size=batch_size, process_index=process,
                    process_count=process_count)
        )
        num_batches.add(len(batches))
        idx = _flat_idx(batches)
        valid = np.concatenate([b["valid"] for b in batches])
        assert all(b["idx"].shape == (batch_size,) for b in batches)
        assert valid.dtype == bool
        real = np.arange(process, n, process_count)
        np.testing.assert_array_equal(idx[valid], real)  # ordered, this process's slice
        assert np.all(valid[: len(real)]) and not np.any(valid[len(real) :])
        pad_value = real[-1] if len(real) else n - 1
        assert np.all(idx[~valid] == pad_value)
        seen.append(idx[valid])
    assert len(num_batches) == 1  # equal batch counts on every process
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(n))


# ---------------------------------------------------------------- TFDS ArrayRecord round trip


def _toy_examples(n=24):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n)
    return images, labels


class MorphjaxTestToy(tfds.core.GeneratorBasedBuilder):
    """Tiny ArrayRecord dataset, written without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(
                    shape=(16, 16, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
                ),
                "label": tfds.features.ClassLabel(num_classes=3),
                "id": np.int32,
            }),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        images, labels = _toy_examples()
        for i, (image, label) in enumerate(zip(images, labels)):
            yield i, {"image": image, "label": int(label), "id": i}


def test_tfds_array_record_round_trip(tmp_path):
    MorphjaxTestToy(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    images, labels = _toy_examples()
    source = data.tfds_source("morphjax_test_toy", "train", data_dir=str(tmp_path))
    assert len(source) == 24
    for i in range(len(source)):
        record = source[i]
        np.testing.assert_array_equal(record["image"], images[record["id"]])
        assert record["label"] == labels[record["id"]]
    batches = _take(data.make_train_dataset(source, batch_size=8, seed=0), 3)
    ids = np.concatenate([b["id"] for b in batches])
    np.testing.assert_array_equal(np.sort(ids), np.arange(24))
    for b in batches:
        np.testing.assert_array_equal(b["image"], images[b["id"]])
        np.testing.assert_array_equal(b["label"], labels[b["id"]])


def test_tfds_source_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        data.tfds_source("morphjax_test_toy", "train", data_dir=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no_such_screen"):
        data.tfds_source("no_such_screen", "train", data_dir=str(tmp_path))
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or prepared


# ---------------------------------------------------------------- shapes dataset


def test_shapes_dataset_deterministic_and_weighted():
    a = data.make_shapes_dataset(200, seed=3)
    b = data.make_shapes_dataset(200, seed=3)
    c = data.make_shapes_dataset(200, seed=4)
    assert a["image"].shape == (200, 32, 32, 3) and a["image"].dtype == np.uint8
    assert a["label"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])
    np.testing.assert_array_equal(np.bincount(a["label"]), [50] * 4)
    weighted = data.make_shapes_dataset(100, class_weights=(0.7, 0.1, 0.1, 0.1), seed=0)
    np.testing.assert_array_equal(np.bincount(weighted["label"]), [70, 10, 10, 10])
    three = data.make_shapes_dataset(
        10, num_classes=3, class_weights=(1, 1, 1), image_size=16, channels=2)
    assert three["image"].shape == (10, 16, 16, 2)
    assert sorted(np.bincount(three["label"])) == [3, 3, 4]
    with pytest.raises(ValueError, match="class_weights"):
        data.make_shapes_dataset(10, class_weights=(1, 2))


def test_shapes_classes_differ_in_morphology():
    d = data.make_shapes_dataset(400, seed=0)
    image = d["image"].astype(np.float32).sum(-1)
    bright = image > 0.5 * image.max(axis=(1, 2), keepdims=True)
    area = bright.sum(axis=(1, 2))
    by_class = [area[d["label"] == k].mean() for k in range(4)]
    assert by_class[1] > 1.5 * by_class[0]  # large vs small round cells
    assert by_class[3] > 1.5 * by_class[2]  # large vs small elongated cells
