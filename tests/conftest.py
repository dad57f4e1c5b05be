"""Shared fixtures: a prepared digits data dir, tiny configs and tiny teachers."""
import os

import jax
import jax.numpy as jnp
import pytest

from zskt_jax import checkpoints, data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
    """The digits dataset prepared once for the whole test session (offline, ~5 s)."""
    data_dir = str(tmp_path_factory.mktemp('tfds'))
    data.load_split('digits', 'test', data_dir)
    return data_dir


def tiny_zero_shot_config(data_dir: str, teacher_path: str):
    """configs/digits.py shrunk to seconds: tiny networks, 3 iterations."""
    from configs import digits
    config = digits.get_config()
    config.data_dir = data_dir
    config.teacher.arch = 'WRN-10-1'
    config.teacher.base_width = 4
    config.teacher.checkpoint = teacher_path
    config.teacher.recipe = ''
    config.student.arch = 'WRN-10-1'
    config.student.base_width = 4
    config.generator.hidden = 8
    config.batch_size = 16
    config.num_iterations = 3
    config.n_s = 2
    config.eval_every = 2
    config.log_every = 1
    config.checkpoint_every = 2
    return config


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
