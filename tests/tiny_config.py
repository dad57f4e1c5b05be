"""The tests' tiny zero-shot config: configs/digits_paper.py (the paper's loop, no stabiliser)
at 32x32, shrunk to seconds (tiny networks, 3 iterations). Plain Python without pytest or JAX, so that the config files the tests hand to
``run.py`` subprocesses can use it too (``write_config_file``)."""
import os

from configs import digits_paper

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)

CONFIG_FILE = '''import sys
sys.path[:0] = [{tests!r}, {root!r}]
from tiny_config import tiny_zero_shot_config


def get_config():
    return tiny_zero_shot_config({data_dir!r}, {teacher!r}, **{overrides!r})
'''


def tiny_zero_shot_config(data_dir: str, teacher_path: str, **overrides):
    config = digits_paper.get_config()
    config.dataset = 'digits'  # 32x32: the tests' tiny teachers take the paper's input size
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
    config.eval_every_iterations = 2
    config.log_every_iterations = 1
    config.checkpoint_every_iterations = 2
    # XLA's convolutions, as the paper's configs (the golden iterations were recorded with them);
    # oneDNN's run in test_onednn.py and test_parallel.py.
    config.convolution = 'xla'
    for name, value in overrides.items():  # 'section.field' names a field of a section
        *sections, field = name.split('.')
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    return config


def write_config_file(path, data_dir: str, teacher_path: str, **overrides) -> str:
    """A config file for ``run.py --config=...`` giving ``tiny_zero_shot_config(...)``."""
    with open(path, 'w') as f:
        f.write(CONFIG_FILE.format(tests=TESTS_DIR, root=ROOT, data_dir=data_dir,
                                   teacher=teacher_path, overrides=overrides))
    return str(path)
