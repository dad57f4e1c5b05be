"""TFDS builder for scikit-learn's bundled handwritten digits, served as 32x32 RGB.

The offline default dataset of the project (DESIGN.md): 1,797 real 8x8 scans with grey levels
0..16 that ship inside scikit-learn, so preparing it needs no network. As a TFDS dataset the
digits demo goes through exactly the same loading path as SVHN and CIFAR-10
(`zskt_jax.data.load_split`), and its 32x32x3 shape lets the paper's networks run unchanged.
"""
import numpy as np
import tensorflow_datasets as tfds

# Fixed so that every machine builds the same split; changing either needs a new VERSION.
_TEST_FRACTION = 0.2
_SPLIT_SEED = 0
_MAX_GREY_LEVEL = 16  # load_digits() pixel values lie in 0..16.
_UPSCALE = 4  # 8x8 -> 32x32, the input size of the paper's networks.


def digits_to_images(grey: np.ndarray) -> np.ndarray:
    """[N, 8, 8] grey levels 0..16 -> [N, 32, 32, 3] uint8, as stored.

    Levels are rescaled to 0..255 (round(x * 255 / 16)); each pixel becomes a constant 4x4
    block (nearest neighbour: no value that was not scanned); grey is repeated in 3 channels.
    """
    levels = np.rint(np.asarray(grey, np.float64) * (255.0 / _MAX_GREY_LEVEL)).astype(np.uint8)
    upscaled = np.repeat(np.repeat(levels, _UPSCALE, axis=1), _UPSCALE, axis=2)
    return np.repeat(upscaled[..., None], 3, axis=-1)


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
    """scikit-learn's handwritten digits (the UCI optdigits test set) as 32x32x3 uint8."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Stratified 1437/360 split of load_digits(), random_state=0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's bundled handwritten digits (1,797 8x8 scans, grey levels "
                "0..16), rescaled to 0..255, upscaled to 32x32 by repeating each pixel into a "
                "4x4 block and repeated into 3 channels. Fixed stratified split: 1437 train / "
                "360 test."
            ),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(32, 32, 3), dtype=np.uint8),
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
        images = digits_to_images(digits.images[indices])  # [N, 32, 32, 3]
        labels = digits.target[indices]
        # Integer keys (disable_shuffling requires them) = position in the split.
        for position, (image, label) in enumerate(zip(images, labels)):
            yield position, {"image": image, "label": int(label)}
