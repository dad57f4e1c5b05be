"""TFDS builder for scikit-learn's bundled handwritten digits, served as RGB at 32x32 or 16x16.

The offline default dataset of the project: 1,797 real 8x8 scans with grey levels
0..16 that ship inside scikit-learn, so preparing it needs no network. As a TFDS dataset the
digits demo goes through exactly the same loading path as SVHN and CIFAR-10
(`zskt_jax.data.load_split`).

Two builder configs, the same scans upscaled by nearest neighbour:
- ``digits/32x32`` (the default config, what ``tfds.builder('digits')`` gives): the paper's input
  size, so the paper's networks and the authors' teachers run unchanged (their last group pools
  8x8);
- ``digits/16x16``: a quarter of the pixels, which is all an 8x8 scan needs (each pixel a 2x2
  block): every network runs about 4x faster, what the CPU default (configs/digits.py) uses.
"""
import numpy as np
import tensorflow_datasets as tfds

# Fixed so that every machine builds the same split; changing either needs a new VERSION.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0
_MAX_GREY_LEVEL = 16  # load_digits() pixel values lie in 0..16.
_SCAN_SIZE = 8


def digits_to_images(grey: np.ndarray, size: int = 32) -> np.ndarray:
    """[N, 8, 8] grey levels 0..16 -> [N, size, size, 3] uint8, as stored.

    Levels are rescaled to 0..255 (round(x * 255 / 16)); each pixel becomes a constant
    (size / 8)-square block (nearest neighbour: no value that was not scanned); grey is repeated
    in 3 channels. Every upscale factor gives the same per-channel mean and std.
    """
    if size % _SCAN_SIZE:
        raise ValueError(f'digits images upscale the 8x8 scans by a whole factor; size {size} '
                         'is not a multiple of 8')
    factor = size // _SCAN_SIZE
    levels = np.rint(np.asarray(grey, np.float64) * (255.0 / _MAX_GREY_LEVEL)).astype(np.uint8)
    upscaled = np.repeat(np.repeat(levels, factor, axis=1), factor, axis=2)
    return np.repeat(upscaled[..., None], 3, axis=-1)


class DigitsConfig(tfds.core.BuilderConfig):
    """One served resolution of the digits: ``size`` x ``size`` x 3."""

    def __init__(self, *, size: int, **kwargs):
        super().__init__(name=f"{size}x{size}", **kwargs)
        self.size = size


def split_indices() -> dict[str, np.ndarray]:
    """Indices into load_digits() of each split, in stored order.

    A stratified 80/20 split (1437 train / 360 test) with a fixed seed, so that both splits
    keep the class proportions of the whole set.
    """
    # Imported here so that merely registering the builder does not import scikit-learn.
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection

    labels = sk_datasets.load_digits().target
    train, test = model_selection.train_test_split(
        np.arange(len(labels)),
        test_size=_TEST_FRACTION,
        stratify=labels,
        random_state=_SPLIT_SEED,
    )
    return {"train": train, "test": test}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's handwritten digits (the UCI optdigits test set) as size x size x 3 uint8."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 split of load_digits(), random_state=0."}
    # The first is the default: tfds.builder('digits') is 'digits/32x32', as before there were
    # configs (same examples, byte for byte).
    BUILDER_CONFIGS = [
        DigitsConfig(size=32, description="The paper's input size (4x4 blocks per scan pixel)."),
        DigitsConfig(size=16, description="2x2 blocks per scan pixel: a quarter of the pixels."),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's bundled handwritten digits (1,797 8x8 scans, grey levels "
                f"0..16), rescaled to 0..255, upscaled to {size}x{size} by repeating each pixel "
                "into a block and repeated into 3 channels. Fixed stratified split: 1437 train "
                "/ 360 test."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            # Store examples in the order train_test_split returns them (keys are positions
            # 0..N-1) rather than TFDS's key-hash order: the split is already shuffled, and this
            # way the stored data can be checked against scikit-learn example by example.
            disable_shuffling=True,
            homepage=(
                "https://scikit-learn.org/stable/modules/generated/"
                "sklearn.datasets.load_digits.html"
            ),
        )

    def _split_generators(self, dl_manager):
        # The data ships inside scikit-learn: `dl_manager` is deliberately unused, so preparing
        # this dataset never touches the network.
        del dl_manager
        return {
            split: self._generate_examples(indices)
            for split, indices in split_indices().items()
        }

    def _generate_examples(self, indices: np.ndarray):
        from sklearn import datasets as sk_datasets

        digits = sk_datasets.load_digits()
        images = digits_to_images(digits.images[indices], self.builder_config.size)  # [N, s, s, 3]
        labels = digits.target[indices]
        # Integer keys (disable_shuffling requires them) = position in the split.
        for position, (image, label) in enumerate(zip(images, labels)):
            yield position, {"image": image, "label": int(label)}
