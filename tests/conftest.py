"""Shared fixtures: a prepared digits data dir, tiny configs and tiny teachers."""
import contextlib
import logging
import os
import tempfile

# The suite compiles many tiny programs, and compiling dominates their running time. Before
# JAX starts (here, for this process and the run.py processes the tests start): XLA:CPU without
# LLVM optimisations (half the compile time of these programs; every comparison is compiled
# alike), and a persistent compilation cache, so that a program compiled once (the same tiny
# iteration in several tests and processes) is compiled once.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_backend_optimization_level=0').strip()
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'zskt_jax_test_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

from zskt_jax import checkpoints, data  # noqa: E402

from tiny_config import ROOT, tiny_zero_shot_config  # noqa: F401,E402 (re-exported)


@contextlib.contextmanager
def project_log(level=logging.INFO):
    """The records the project's logger ('zskt_jax') emits at ``level`` or above in the block,
    from a handler on that logger itself: pytest's caplog listens on the root logger, and a job
    run in this process before (launch.main) stops the project's logger propagating there."""
    records, handler, logger = [], logging.Handler(level), logging.getLogger('zskt_jax')
    handler.emit = records.append
    old_level = logger.level
    if old_level == logging.NOTSET or old_level > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


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


def read_events(logdir: str):
    """{tag: [(step, value), ...]} of the TensorBoard event files in ``logdir`` (any path
    tf.io.gfile opens, gs:// included), read as TensorBoard reads them: scalars as floats,
    images as their encoded strings."""
    import numpy as np
    import tensorflow as tf
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util
    events = {}
    for path in sorted(tf.io.gfile.glob(f'{logdir}/events.out.tfevents.*')):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                array = tensor_util.make_ndarray(value.tensor)
                events.setdefault(value.tag, []).append(
                    (event.step, float(array) if array.ndim == 0 else list(array)))
    return events


# The heaviest test files first, by their cold-cache seconds on a 2-core Intel Xeon Processor
# (family 6 model 167, 2026-12-05: 143 s down to 23 s): pytest-xdist hands out whole files
# (pytest.ini) in this order, so the long ones do not start last on one core.
HEAVY_FIRST = ('test_multihost.py', 'test_benchmark.py', 'test_checkpoints.py', 'test_parallel.py',
               'test_stabilisers.py', 'test_toolbox_pairs.py', 'test_run.py',
               'test_seeds_and_precision.py', 'test_zero_shot.py', 'test_onednn.py', 'test_gcs.py',
               'test_toolbox_models.py', 'test_methods.py', 'test_install.py', 'test_belief.py')


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
