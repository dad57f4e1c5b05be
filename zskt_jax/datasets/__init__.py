"""The project's own TFDS builders.

Importing this package registers them with TFDS, after which `tfds.builder('digits')`
finds them like any built-in dataset.
"""

from zskt_jax.datasets import digits  # noqa: F401  (registers 'digits')
from zskt_jax.datasets.digits import Digits  # noqa: F401
