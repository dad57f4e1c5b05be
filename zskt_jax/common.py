"""Pieces every job shares: building the networks from the config, finding the teacher,
evaluation data and the accuracy function."""
import logging
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from zskt_jax import checkpoints, data, parallel
from zskt_jax.models import Generator, build_wide_resnet
from zskt_jax.parallel import DATA_AXIS

logger = logging.getLogger('zskt_jax')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config):
    name = config.get('compute_dtype', 'float32')
    if name not in DTYPES:
        raise ValueError(f'config.compute_dtype = {name!r}; choose one of {sorted(DTYPES)}')
    return DTYPES[name]


def build_network(net_config, num_classes: int, config):
    """A WideResNet from a ``config.teacher`` / ``config.student`` section."""
    return build_wide_resnet(net_config.arch, num_classes, net_config.base_width,
                             axis_name=DATA_AXIS, dtype=compute_dtype(config))


def build_generator(config):
    image_size = data.dataset_info(config.dataset).image_shape[0]
    if image_size % 4:
        raise ValueError(f'the generator upsamples x4; image size {image_size} is not a multiple of 4')
    return Generator(init_size=image_size // 4, hidden=config.generator.hidden,
                     axis_name=DATA_AXIS, dtype=compute_dtype(config))


def teacher_dir(config) -> str:
    """Where this config's teacher lives: ``config.teacher.checkpoint`` or the teacher job's
    default output, ``runs/teacher_{dataset}_{arch}/teacher``."""
    if config.teacher.checkpoint:
        return config.teacher.checkpoint
    return os.path.join(default_teacher_workdir(config.dataset, config.teacher.arch), 'teacher')


def default_teacher_workdir(dataset: str, arch: str) -> str:
    return os.path.join('runs', f'teacher_{dataset}_{arch}')


def load_teacher_for(config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The teacher's variables and record, checked against the config and dataset."""
    path = teacher_dir(config)
    info = data.dataset_info(config.dataset)
    hint = (f'python run.py --config=configs/teacher_{config.dataset}.py '
            f'--config.teacher.arch={config.teacher.arch} --workdir={os.path.dirname(os.path.abspath(path))}'
            f'\n(or import the authors\' PyTorch teacher, see the README), or point '
            f'--config.teacher.checkpoint at an existing teacher directory.')
    variables, meta = checkpoints.load_teacher(path, make_hint=hint)
    checkpoints.check_teacher(meta, num_classes=info.num_classes, image_shape=info.image_shape,
                              teacher_arch=config.teacher.arch,
                              teacher_base_width=config.teacher.base_width, path=path)
    return variables, meta


def load_eval_split(config, split: str = None):
    info = data.dataset_info(config.dataset)
    images, labels = data.load_split(config.dataset, split or info.test_split,
                                     config.data_dir or None)
    return images, labels


class Evaluator:
    """Top-1 accuracy of a WideResNet (inference-mode BN) on a split held in host memory."""

    def __init__(self, model, dataset: str, images: np.ndarray, labels: np.ndarray,
                 batch_size: int, mesh):
        self.images, self.labels, self.batch_size, self.mesh = images, labels, batch_size, mesh
        preprocess = lambda x: data.normalize(x, dataset)
        self.accuracy_fn = parallel.make_accuracy_fn(model.apply, preprocess, mesh)

    def __call__(self, variables) -> float:
        return parallel.evaluate_accuracy(self.accuracy_fn, variables, self.images, self.labels,
                                          self.batch_size, self.mesh)
