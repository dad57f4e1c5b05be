"""Shared fixtures: a prepared digits data dir, tiny configs and tiny teachers."""
import os

import jax
import jax.numpy as jnp
import pytest

from zskt_jax import checkpoints, data

from tiny_config import ROOT, tiny_zero_shot_config  # noqa: F401 (re-exported to the tests)


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
    """The digits dataset prepared once for the whole test session (offline, ~5 s)."""
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    data.load_split('digits', 'test', data_dir)
    return data_dir


def write_teacher(path: str, arch='WRN-10-1', base_width=4, num_classes=10, seed=0,
                  image_shape=(32, 32, 3), dataset='digits'):
    """A freshly initialised (untrained) teacher in the format the jobs load."""
    from zskt_jax.models import build_wide_resnet
    from zskt_jax.state import init_variables
    model = build_wide_resnet(arch, num_classes, base_width)
    variables = init_variables(model, jax.random.key(seed), jnp.zeros((1,) + tuple(image_shape)))
    checkpoints.save_teacher(path, variables, {
        'arch': arch, 'base_width': base_width, 'num_classes': num_classes,
        'image_shape': list(image_shape), 'dataset': dataset, 'source': 'test'})
    return path


@pytest.fixture(scope='session')
def tiny_teacher(tmp_path_factory):
    return write_teacher(str(tmp_path_factory.mktemp('teacher') / 'teacher'))
