"""Datasets: what each one is, whole TFDS splits in memory, normalisation, host sharding.

Every dataset, paper or demo, goes through TFDS. Splits are small enough (at most
73,257 images of 32x32x3 uint8, 225 MB) to hold in host memory, which keeps evaluation a plain
loop over a NumPy array and its order reproducible.

Data prepared in TFDS's array_record format is read with ``tfds.data_source`` (random access,
no TensorFlow); data in the default tfrecord format is read through ``tf.data`` and needs
TensorFlow. Preparing any dataset, the digits included, needs TensorFlow (TFDS encodes the
images with it). A machine without TensorFlow (a GPU image, say) reads data prepared elsewhere
as array_record: ``benchmarks/prepare_device.py`` prepares the digits that way.
"""
import dataclasses
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from zskt_jax.errors import ConfigError, UserError
from zskt_jax import datasets as _own_builders  # noqa: F401  (registers 'digits' with TFDS)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the rest of the project needs to know about one dataset.

    mean and std are per channel, of the training images scaled to [0, 1].
    """

    name: str  # Our name, the key in DATASETS.
    tfds_name: str  # The TFDS builder.
    num_classes: int
    image_shape: tuple[int, int, int]  # [H, W, C] of one stored uint8 image.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_split: str = "train"
    test_split: str = "test"


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # Computed once from the 'train' split of zskt_jax/datasets/digits.py (grey, so the
        # channels are equal; nearest-neighbour upscaling leaves them equal at every size);
        # tests/test_data.py checks them against the data.
        DatasetSpec(
            name="digits",
            tfds_name="digits/32x32",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.3054, 0.3054, 0.3054),
            std=(0.3760, 0.3760, 0.3760),
        ),
        # The same scans at 16x16 (2x2 blocks): the CPU default's resolution (configs/digits.py).
        DatasetSpec(
            name="digits16",
            tfds_name="digits/16x16",
            num_classes=10,
            image_shape=(16, 16, 3),
            mean=(0.3054, 0.3054, 0.3054),
            std=(0.3760, 0.3760, 0.3760),
        ),
        # docs/method.md, section "Evaluation". SVHN's 'extra' split is not used.
        DatasetSpec(
            name="svhn",
            tfds_name="svhn_cropped",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4377, 0.4438, 0.4728),
            std=(0.1980, 0.2010, 0.1970),
        ),
        # docs/method.md, section "Evaluation".
        DatasetSpec(
            name="cifar10",
            tfds_name="cifar10",
            num_classes=10,
            image_shape=(32, 32, 3),
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
        ),
        DatasetSpec(
            name="cifar100",
            tfds_name="cifar100",
            num_classes=100,
            image_shape=(32, 32, 3),
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
        ),
    )
}

# Datasets whose TFDS builder prepares them without a network.
_OFFLINE_DATASETS = frozenset({"digits", "digits16"})


class DatasetNotPreparedError(UserError, FileNotFoundError):
    """A dataset that TFDS must download is not prepared in the data directory."""


def dataset_info(name: str) -> DatasetSpec:
    """The DatasetSpec of `name`; ValueError listing the known names if there is none."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(
            f"Unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}."
        ) from None


def quiet_tensorflow() -> None:
    """For the commands, before anything imports TensorFlow: it only reads data and writes
    summaries here, and its start-up lines (one of them about its own use of oneDNN, not this
    project's convolutions) are noise in their output. Variables already set win."""
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


def _hide_gpus_from_tensorflow() -> None:
    # TFDS reads through TensorFlow. A GPU build of TensorFlow would reserve most of the
    # accelerator memory that JAX needs; the input pipeline only ever needs the CPU.
    try:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except (ImportError, RuntimeError):
        pass  # RuntimeError: TensorFlow's devices are already initialised; leave them.


def _not_prepared_error(spec: DatasetSpec, data_dir_root: str) -> DatasetNotPreparedError:
    command = (
        'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{spec.tfds_name}', data_dir='{data_dir_root}').download_and_prepare()\""
    )
    return DatasetNotPreparedError(
        f"Dataset {spec.name!r} (TFDS '{spec.tfds_name}') is not prepared in data_dir "
        f"{data_dir_root!r}, and preparing it needs a download (this machine may have no "
        "internet). Prepare it with TFDS on a machine with internet:\n"
        f"  {command}\n"
        f"then copy the folder {os.path.join(data_dir_root, spec.tfds_name)} into this "
        "machine's data_dir, or pass the data_dir where it already is."
    )


def tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _needs_tensorflow_error(spec: DatasetSpec, data_dir_root: str, what: str) -> UserError:
    command = (
        'python -c "import tensorflow_datasets as tfds; import zskt_jax.datasets; '
        f"tfds.builder('{spec.tfds_name}', data_dir='DIR', file_format='array_record')"
        '.download_and_prepare()"'
    )
    return DatasetNotPreparedError(
        f"Dataset {spec.name!r} (TFDS '{spec.tfds_name}') in data_dir {data_dir_root!r}: "
        f"{what} needs TensorFlow, which is not installed here. Prepare the data in TFDS's "
        "array_record format on a machine with TensorFlow (for the digits: python "
        "benchmarks/prepare_device.py; otherwise:\n"
        f"  {command}\n"
        "), copy DIR here and pass it as --config.data_dir (or $TFDS_DATA_DIR); array_record "
        "data is read without TensorFlow."
    )


def _read_data_source(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A whole split of array_record data through tfds.data_source (no TensorFlow), in the
    stored order: the same examples in the same order as tf.data reads them."""
    source = builder.as_data_source(split=split)
    examples = source.__getitems__(range(len(source))) if len(source) else []
    if not examples:
        shape = builder.info.features["image"].shape
        return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
    images = np.stack([np.asarray(example["image"], np.uint8) for example in examples])
    labels = np.asarray([example["label"] for example in examples], dtype=np.int32)
    return images, labels


def load_split(
    name: str, split: str, data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory, in the split's stored order.

    Args:
        name: a key of DATASETS ('digits', 'digits16', 'svhn', 'cifar10', 'cifar100').
        split: a TFDS split of it, normally spec.train_split or spec.test_split (TFDS slicing
            such as 'train[:1000]' works too).
        data_dir: the TFDS data directory; None means TFDS's default ($TFDS_DATA_DIR or
            ~/tensorflow_datasets). The digits are prepared there on first use, offline.

    Returns:
        images [N, H, W, 3] uint8 (the spec's image_shape) and labels [N] int32.

    Raises:
        ValueError: unknown dataset or split.
        DatasetNotPreparedError: a dataset other than the digits is not prepared in data_dir.
    """
    spec = dataset_info(name)
    builder = tfds.builder(
        spec.tfds_name, data_dir=None if data_dir is None else os.fspath(data_dir)
    )
    if not builder.is_prepared():
        if spec.name not in _OFFLINE_DATASETS:
            raise _not_prepared_error(spec, os.fspath(builder.data_dir_root))
        if not tensorflow_installed():
            raise _needs_tensorflow_error(spec, os.fspath(builder.data_dir_root), "preparing it")
        try:
            builder.download_and_prepare()
        except OSError as error:
            raise DatasetNotPreparedError(
                f"Dataset {spec.name!r} could not be prepared in data_dir "
                f"{os.fspath(builder.data_dir_root)!r} ({type(error).__name__}: {error}). Pass a "
                "directory you can write to as --config.data_dir (or $TFDS_DATA_DIR)."
            ) from None

    known_splits = sorted(builder.info.splits.keys())
    if split.isidentifier() and split not in known_splits:
        raise ConfigError(
            f"Dataset {spec.name!r} has no split {split!r}; its splits: "
            f"{', '.join(known_splits)}."
        )

    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        images, labels = _read_data_source(builder, split)
    elif not tensorflow_installed():
        raise _needs_tensorflow_error(
            spec, os.fspath(builder.data_dir_root),
            f"reading its {builder.info.file_format.value} files",
        )
    else:
        _hide_gpus_from_tensorflow()
        dataset = builder.as_dataset(
            split=split,
            batch_size=-1,  # The whole split as one batch.
            shuffle_files=False,
            # TFDS interleaves 16 files at a time by default; 1 reads the shards one after the
            # other, i.e. the stored order, whatever the number of shards.
            read_config=tfds.ReadConfig(interleave_cycle_length=1),
        )
        examples = tfds.as_numpy(dataset)
        images = np.asarray(examples["image"], dtype=np.uint8)
        labels = np.asarray(examples["label"], dtype=np.int32)
    if images.shape[1:] != spec.image_shape:
        raise ValueError(
            f"Dataset {spec.name!r} split {split!r}: images of shape {images.shape[1:]}, "
            f"expected {spec.image_shape}."
        )
    return images, labels


def normalize(images, name: str) -> jnp.ndarray:
    """uint8 images [..., H, W, 3] -> float32 (x / 255 - mean) / std, per channel.

    jnp, so that it runs inside jit on the accelerator and images travel there as uint8 (4x
    less to transfer); `name` must be a static Python string.
    """
    spec = dataset_info(name)
    mean = jnp.asarray(spec.mean, dtype=jnp.float32)
    std = jnp.asarray(spec.std, dtype=jnp.float32)
    return (jnp.asarray(images, dtype=jnp.float32) / 255.0 - mean) / std


def shard_indices(num_examples: int, process_index: int, process_count: int) -> slice:
    """The contiguous slice of example indices that host `process_index` evaluates.

    Shares are nearly equal (the first num_examples % process_count hosts get one more) and
    together cover every example exactly once with no padding, so the hosts' summed correct
    counts divided by num_examples is the exact test accuracy.
    """
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}.")
    base, remainder = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, remainder)
    stop = start + base + (1 if process_index < remainder else 0)
    return slice(start, stop)
