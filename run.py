"""Entry point: python run.py --config=configs/digits.py [--workdir=runs/digits] [--config.n_s=5]

Parses flags, starts JAX (multi-host where asked), picks the job from ``config.job`` and hands it
``(config, workdir)``. Everything else lives in ``zskt_jax``.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file; override fields with '
                                '--config.FIELD=VALUE.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, TensorBoard, results.json). '
                    'Default: runs/<config file name>.')
FLAGS = flags.FLAGS

# config.job -> the module whose train_and_evaluate(config, workdir) runs it.
JOBS = {
    'zero_shot': 'zskt_jax.zero_shot',
    'teacher': 'zskt_jax.teacher',
    'few_shot': 'zskt_jax.few_shot',
    'belief': 'zskt_jax.belief',
}


def default_workdir(config, config_path: str) -> str:
    """runs/<config file name>; a teacher goes where the distillation looks for it by default."""
    if config.job == 'teacher':
        from zskt_jax import common
        return common.default_teacher_workdir(config.dataset, config.teacher.arch)
    return os.path.join('runs', os.path.splitext(os.path.basename(config_path))[0])


def run_job(config, workdir: str):
    import importlib
    if config.job not in JOBS:
        raise ValueError(f'config.job = {config.job!r}; choose one of {sorted(JOBS)}')
    return importlib.import_module(JOBS[config.job]).train_and_evaluate(config, workdir)


def load_config_file(path: str):
    """``get_config()`` of a config file given by path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'config_{abs(hash(path))}', path)
    if spec is None or not os.path.exists(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def train_teacher_if_missing(config):
    """The embedded default trains its own teacher first (``config.teacher.recipe``)."""
    from zskt_jax import common
    recipe = config.teacher.get('recipe', '')
    if not recipe or os.path.exists(os.path.join(common.teacher_dir(config), 'teacher.json')):
        return
    teacher_config = load_config_file(recipe)
    workdir = os.path.dirname(os.path.abspath(common.teacher_dir(config)))
    logging.info('No teacher at %s: training one with %s first.', common.teacher_dir(config), recipe)
    run_job(teacher_config, workdir)


def setup_logging():
    """Our progress lines on stdout; the libraries' INFO chatter (Orbax, TFDS) off."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger('zskt_jax')
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    setup_logging()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config, config_flags.get_config_filename(FLAGS['config']))
    if config.job == 'zero_shot':
        train_teacher_if_missing(config)
    results = run_job(config, workdir)
    if results:
        summary = {k: v for k, v in results.items() if k.endswith('accuracy')}
        print(' '.join(f'{k}={100 * v:.2f}%' for k, v in summary.items()))


def check_overrides(argv) -> None:
    """Fail early, naming the field, when a --config.FIELD override names no field of the config
    (ml_collections would otherwise fail with a bare AttributeError deep in flag parsing)."""
    config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if config_path is None:
        return
    config = load_config_file(config_path)
    for arg in argv:
        if not arg.startswith('--config.'):
            continue
        dotted = arg[len('--config.'):].split('=', 1)[0]
        node = config
        for depth, part in enumerate(dotted.split('.')):
            if not hasattr(node, 'keys') or part not in node.keys():
                parent = '.'.join(dotted.split('.')[:depth]) or '<top level>'
                known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a section)'
                sys.exit(f'Unknown config field {dotted!r} in {arg!r}: {config_path} has no '
                         f'{part!r} under {parent}. Fields there: {known}')
            node = node[part]


if __name__ == '__main__':
    check_overrides(sys.argv[1:])
    app.run(main)
