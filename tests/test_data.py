"""Tests of zskt_jax.data and the digits TFDS builder.

SVHN and CIFAR-10 cannot be downloaded here, so their real TFDS builders are fed small raw files
in the real source formats (CIFAR-10's `cifar-10-batches-bin`, SVHN's .mat files) through a
patched download manager; everything after the download is TFDS's own code. All data dirs are
pytest temporary directories, never ~/tensorflow_datasets.
"""
import os

import jax
import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets

from zskt_jax import data
from zskt_jax.datasets import digits as digits_builder

DIGITS_TRAIN, DIGITS_TEST = 1437, 360


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """A data dir where load_split prepared 'digits' (once for the module)."""
    data_dir = tmp_path_factory.mktemp("digits_data")
    data.load_split("digits", "train", data_dir=data_dir)
    return data_dir


@pytest.fixture(scope="module")
def digits_train(digits_dir):
    return data.load_split("digits", "train", data_dir=digits_dir)


@pytest.fixture(scope="module")
def digits_test(digits_dir):
    return data.load_split("digits", "test", data_dir=digits_dir)


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_sizes_and_types(digits_train, digits_test):
    for (images, labels), size in ((digits_train, DIGITS_TRAIN), (digits_test, DIGITS_TEST)):
        assert images.shape == (size, 32, 32, 3)
        assert images.dtype == np.uint8
        assert labels.shape == (size,)
        assert labels.dtype == np.int32
        assert set(np.unique(labels)) == set(range(10))


def test_digits_class_balance_is_stratified(digits_train, digits_test):
    all_labels = sk_datasets.load_digits().target
    total = np.bincount(all_labels, minlength=10)
    train = np.bincount(digits_train[1], minlength=10)
    test = np.bincount(digits_test[1], minlength=10)
    expected_train = total * DIGITS_TRAIN / len(all_labels)
    expected_test = total * DIGITS_TEST / len(all_labels)
    print("class counts total", total.tolist())
    print("train", train.tolist(), "expected", np.round(expected_train, 1).tolist())
    print("test ", test.tolist(), "expected", np.round(expected_test, 1).tolist())
    np.testing.assert_array_equal(train + test, total)
    assert np.all(np.abs(train - expected_train) <= 1)
    assert np.all(np.abs(test - expected_test) <= 1)


def test_digits_value_range_channels_and_blocks(digits_train, digits_test):
    images = np.concatenate([digits_train[0], digits_test[0]])
    assert images.min() == 0 and images.max() == 255
    # Only the 17 rescaled grey levels round(k * 255 / 16) occur.
    levels = {int(np.rint(k * 255 / 16)) for k in range(17)}
    assert set(np.unique(images).tolist()) <= levels
    # Grey: the three channels are identical.
    np.testing.assert_array_equal(images[..., 0], images[..., 1])
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    # Nearest-neighbour upscaling: every 4x4 block is constant.
    blocks = images.reshape(-1, 8, 4, 8, 4, 3)
    np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape))


def test_digits_match_scikit_learn_in_split_order(digits_train, digits_test):
    """The stored examples are load_digits() in train_test_split order, converted exactly."""
    sk = sk_datasets.load_digits()
    indices = digits_builder.split_indices()
    for (images, labels), split in ((digits_train, "train"), (digits_test, "test")):
        np.testing.assert_array_equal(labels, sk.target[indices[split]])
        np.testing.assert_array_equal(
            images, digits_builder.digits_to_images(sk.images[indices[split]])
        )
    # By hand: grey 16 -> 255, 8 -> 127.5 -> 128 (the only tie of k * 255 / 16; half-up and
    # half-to-even agree on it), 1 -> 15.9375 -> 16, 0 -> 0.
    converted = digits_builder.digits_to_images(np.array([[[16, 8, 1, 0] * 2] * 8]))
    np.testing.assert_array_equal(converted[0, 0, ::4, 0], [255, 128, 16, 0] * 2)


def test_digits_prepare_is_deterministic(tmp_path, digits_train, digits_test):
    """Two fresh prepares (the module's and one more) give identical arrays."""
    for split, (images, labels) in (("train", digits_train), ("test", digits_test)):
        images_again, labels_again = data.load_split("digits", split, data_dir=tmp_path)
        np.testing.assert_array_equal(images_again, images)
        np.testing.assert_array_equal(labels_again, labels)


def test_digits_16x16_are_the_same_scans_in_2x2_blocks(digits_dir, digits_train, digits_test):
    """digits16 (builder config 16x16) holds the 32x32 images subsampled by 2: the same scans,
    each pixel a 2x2 block, the same labels and order; the 32x32 data are what the builder
    served before it had configs (tfds.builder('digits') is still them)."""
    for split, (images, labels) in (("train", digits_train), ("test", digits_test)):
        small, small_labels = data.load_split("digits16", split, data_dir=digits_dir)
        assert small.shape == (len(labels), 16, 16, 3) and small.dtype == np.uint8
        np.testing.assert_array_equal(small_labels, labels)
        np.testing.assert_array_equal(small, images[:, ::2, ::2])
        blocks = small.reshape(-1, 8, 2, 8, 2, 3)
        np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1, :, :1], blocks.shape))
    assert tfds.builder("digits", data_dir=digits_dir).builder_config.name == "32x32"
    with pytest.raises(ValueError, match="size 12 is not a multiple of 8"):
        digits_builder.digits_to_images(np.zeros((1, 8, 8)), 12)


def test_digits_normalisation_constants_match_data(digits_train):
    spec = data.dataset_info("digits")
    scaled = digits_train[0].astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 1, 2))
    std = scaled.std(axis=(0, 1, 2))
    print("digits train mean", mean, "std", std)
    np.testing.assert_allclose(mean, spec.mean, atol=1e-3)
    np.testing.assert_allclose(std, spec.std, atol=1e-3)
    # Normalised training data is then ~zero-mean, unit-variance per channel.
    normalised = np.asarray(data.normalize(digits_train[0], "digits"))
    np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), 0.0, atol=5e-3)
    np.testing.assert_allclose(normalised.std(axis=(0, 1, 2)), 1.0, atol=5e-3)


# ---------------------------------------------------------------------------------------------
# dataset_info, normalize, shard_indices


def test_dataset_info_entries_and_unknown_name():
    assert data.dataset_info("svhn").tfds_name == "svhn_cropped"
    assert data.dataset_info("svhn").mean == (0.4377, 0.4438, 0.4728)
    assert data.dataset_info("svhn").std == (0.1980, 0.2010, 0.1970)
    assert data.dataset_info("cifar10").mean == (0.4914, 0.4822, 0.4465)
    assert data.dataset_info("cifar10").std == (0.2023, 0.1994, 0.2010)
    assert data.dataset_info("cifar100").num_classes == 100
    for spec in data.DATASETS.values():
        assert spec.image_shape == ((16, 16, 3) if spec.name == "digits16" else (32, 32, 3))
        assert (spec.train_split, spec.test_split) == ("train", "test")
    # The two digits resolutions: builder configs of one builder, the same constants.
    assert data.dataset_info("digits").tfds_name == "digits/32x32"
    assert data.dataset_info("digits16").tfds_name == "digits/16x16"
    assert data.dataset_info("digits16").mean == data.dataset_info("digits").mean
    assert data.dataset_info("digits16").std == data.dataset_info("digits").std
    with pytest.raises(ValueError, match=r"'mnist'.*cifar10, cifar100, digits, digits16, svhn"):
        data.dataset_info("mnist")


def test_normalize_by_hand():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, 0, 0] = (0, 128, 255)
    images[1, 5, 7] = (51, 102, 204)
    expected_00 = [
        (0 / 255 - 0.4914) / 0.2023,
        (128 / 255 - 0.4822) / 0.1994,
        (255 / 255 - 0.4465) / 0.2010,
    ]
    expected_157 = [
        (0.2 - 0.4914) / 0.2023,
        (0.4 - 0.4822) / 0.1994,
        (0.8 - 0.4465) / 0.2010,
    ]
    eager = data.normalize(images, "cifar10")
    jitted = jax.jit(lambda x: data.normalize(x, "cifar10"))(jax.numpy.asarray(images))
    for out in (eager, jitted):
        assert out.dtype == np.float32 and out.shape == (2, 32, 32, 3)
        np.testing.assert_allclose(out[0, 0, 0], expected_00, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[1, 5, 7], expected_157, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            out[1, 0, 0],
            [-0.4914 / 0.2023, -0.4822 / 0.1994, -0.4465 / 0.2010],
            rtol=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize(
    "num_examples,process_count", [(10, 3), (26032, 8), (10000, 3), (7, 8), (0, 2), (360, 1)]
)
def test_shard_indices_cover_everything_once(num_examples, process_count):
    shards = [data.shard_indices(num_examples, i, process_count) for i in range(process_count)]
    covered = np.concatenate([np.arange(num_examples)[s] for s in shards])
    np.testing.assert_array_equal(covered, np.arange(num_examples))  # In order, each once.
    sizes = [s.stop - s.start for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == num_examples


def test_shard_indices_rejects_bad_arguments():
    assert data.shard_indices(10, 2, 3) == slice(7, 10)
    with pytest.raises(ValueError, match="process_index"):
        data.shard_indices(10, 3, 3)
    with pytest.raises(ValueError, match="process_count"):
        data.shard_indices(10, 0, 0)


# ---------------------------------------------------------------------------------------------
# Real TFDS builders (cifar10, svhn_cropped) on small raw files


def _patched_download_manager(local_files):
    """Makes TFDS's DownloadManager answer with local files, keyed by the URL's basename."""
    def resolve(urls):
        if isinstance(urls, dict):
            return {key: resolve(url) for key, url in urls.items()}
        return local_files[os.path.basename(urls)]

    patch = pytest.MonkeyPatch()
    for method in ("download", "download_and_extract"):
        patch.setattr(tfds.download.DownloadManager, method, lambda self, urls: resolve(urls))
    return patch


def _distinct_images(rng, count):
    """[count, 32, 32, 3] uint8 random images, pixel [0, 0, 0] = index so each is unique."""
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(count)
    return images


def _assert_same_examples(images, labels, expected_images, expected_labels):
    """Same (image, label) pairs, whatever order TFDS stored them in."""
    assert images.shape == expected_images.shape and images.dtype == np.uint8
    assert labels.shape == expected_labels.shape and labels.dtype == np.int32
    expected = {img.tobytes(): int(lbl) for img, lbl in zip(expected_images, expected_labels)}
    got = {img.tobytes(): int(lbl) for img, lbl in zip(images, labels)}
    assert got == expected


@pytest.fixture(scope="module")
def cifar10_prepared(tmp_path_factory):
    """A prepared cifar10 data dir built by the real builder from cifar-10-batches-bin files."""
    raw = tmp_path_factory.mktemp("cifar10_raw")
    batches = raw / "cifar-10-batches-bin"
    batches.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    files = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    for split, names in files.items():
        per_file = 4 if split == "train" else 6
        images = _distinct_images(rng, per_file * len(names))
        labels = np.arange(len(images)) % 10
        written[split] = (images, labels)
        for n, name in enumerate(names):
            rows = slice(n * per_file, (n + 1) * per_file)
            # Each record: 1 label byte, then the image as 3 planes of 32x32 (channel-major).
            records = [
                np.concatenate([[lbl], img.transpose(2, 0, 1).reshape(-1)]).astype(np.uint8)
                for img, lbl in zip(images[rows], labels[rows])
            ]
            (batches / name).write_bytes(b"".join(r.tobytes() for r in records))
    (batches / "batches.meta.txt").write_text(
        "\n".join(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]) + "\n"
    )
    data_dir = tmp_path_factory.mktemp("cifar10_data")
    patch = _patched_download_manager({"cifar-10-binary.tar.gz": str(raw)})
    try:
        tfds.builder("cifar10", data_dir=str(data_dir)).download_and_prepare()
    finally:
        patch.undo()
    return data_dir, written


@pytest.fixture(scope="module")
def svhn_prepared(tmp_path_factory):
    """A prepared svhn_cropped data dir built by the real builder from .mat files."""
    raw = tmp_path_factory.mktemp("svhn_raw")
    rng = np.random.default_rng(1)
    written, local_files = {}, {}
    for split, count in (("train", 12), ("test", 10), ("extra", 3)):
        images = _distinct_images(rng, count)
        digits = np.arange(count) % 10
        # SVHN's format: X is [32, 32, 3, N], y is [N, 1] with digit 0 stored as 10.
        mat_labels = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
        path = raw / f"{split}_32x32.mat"
        scipy.io.savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": mat_labels})
        written[split] = (images, digits)
        local_files[path.name] = str(path)
    data_dir = tmp_path_factory.mktemp("svhn_data")
    patch = _patched_download_manager(local_files)
    try:
        tfds.builder("svhn_cropped", data_dir=str(data_dir)).download_and_prepare()
    finally:
        patch.undo()
    return data_dir, written


@pytest.mark.parametrize("name,prepared", [("cifar10", "cifar10_prepared"),
                                           ("svhn", "svhn_prepared")])
def test_real_builder_pipeline(name, prepared, request):
    data_dir, written = request.getfixturevalue(prepared)
    spec = data.dataset_info(name)
    for split in (spec.train_split, spec.test_split):
        images, labels = data.load_split(name, split, data_dir=data_dir)
        _assert_same_examples(images, labels, *written[split])
        # Stored order is stable: a second load gives the same arrays.
        images_again, labels_again = data.load_split(name, split, data_dir=data_dir)
        np.testing.assert_array_equal(images_again, images)
        np.testing.assert_array_equal(labels_again, labels)
    normalised = np.asarray(data.normalize(images[3], name))
    expected = (images[3].astype(np.float64) / 255.0 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(normalised, expected, rtol=1e-5, atol=1e-5)


def test_unknown_split_is_a_clear_error(svhn_prepared):
    with pytest.raises(ValueError, match=r"no split 'validation'.*extra, test, train"):
        data.load_split("svhn", "validation", data_dir=svhn_prepared[0])


@pytest.mark.parametrize("name,tfds_name", [("svhn", "svhn_cropped"), ("cifar10", "cifar10")])
def test_unprepared_download_dataset_is_a_clear_error(name, tfds_name, tmp_path):
    with pytest.raises(data.DatasetNotPreparedError) as error:
        data.load_split(name, "test", data_dir=tmp_path)
    message = str(error.value)
    print(message)
    assert isinstance(error.value, FileNotFoundError)
    assert repr(name) in message and f"'{tfds_name}'" in message
    assert str(tmp_path) in message
    assert f"tfds.builder('{tfds_name}', data_dir='{tmp_path}').download_and_prepare()" in message
