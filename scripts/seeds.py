"""Run one configuration over seeds 0, 1, 2 and print mean +- std of the final accuracy, the
paper's format (docs/method.md, section "Evaluation": the FINAL iterate, mean +- std over 3 seeds).

  python scripts/seeds.py --config=configs/cifar10.py --workdir=runs/cifar10_40-2_16-2 \\
      --config.student.arch=WRN-16-2

Seed i runs as `run.py` would with --config.seed=i --workdir={workdir}/seed_{i}; every other
--config.* override passes through. A seed whose results.json exists is not run again (an
interrupted seed resumes from its checkpoints). The std is the population std (numpy's default,
ddof=0); the paper does not say which one it reports. The summary is also written to
{workdir}/seeds.json.
"""
import copy
import json
import os
import sys
from typing import Callable, Dict, Sequence, Tuple

# This checkout's zskt_jax first, whether or not the project is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from zskt_jax import cli  # defines --config, --workdir, --verbose exactly as run.py; runs main
from zskt_jax import errors, launch, methods, validation

flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds to run (config.seed of each run); seed i '
                  'runs in {workdir}/seed_{i}.')
flags.DEFINE_string('metric', 'student_accuracy', 'The results.json field to summarise.')
FLAGS = flags.FLAGS

DDOF = 0  # population std, numpy's default; stated in every summary line


def seed_workdir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, f'seed_{seed}')


# Fields of an existing results.json that must match the configuration being summarised.
IDENTITY_FIELDS = ('job', 'dataset', 'teacher.arch', 'student.arch')


def _get(tree, dotted):
    for part in dotted.split('.'):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def read_result(workdir: str, metric: str, seed: int = None, config=None) -> float:
    """``metric`` from ``{workdir}/results.json``; checks that the run used ``seed`` and, given
    ``config``, the same job, dataset and networks."""
    path = os.path.join(workdir, 'results.json')
    with open(path) as f:
        results = json.load(f)
    recorded = results.get('config', {})
    if seed is not None and recorded.get('seed', seed) != seed:
        raise errors.ConfigError(f"{path} was written by a run with seed {recorded.get('seed')}, not "
                         f'{seed}; use another --workdir or remove it.')
    if config is not None and recorded:
        wanted = config.to_dict()
        differ = [f'{f}: {_get(recorded, f)!r} there, {_get(wanted, f)!r} now'
                  for f in IDENTITY_FIELDS
                  if _get(recorded, f) is not None and _get(recorded, f) != _get(wanted, f)]
        if differ:
            raise errors.ConfigError(f'{path} comes from another configuration ({"; ".join(differ)}); '
                             'use another --workdir or remove it.')
    if metric not in results:
        raise errors.ConfigError(f'{path} has no {metric!r}; it has {sorted(results)}')
    return float(results[metric])


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(np.mean(values)), float(np.std(values, ddof=DDOF))


def format_mean_std(values: Sequence[float]) -> str:
    """Accuracies as fractions -> '94.06 +- 0.27' (percent, two decimals, as the paper)."""
    mean, std = mean_std(100 * np.asarray(values, np.float64))
    return f'{mean:.2f} +- {std:.2f}'


def run_seeds(config, workdir: str, seeds: Sequence[int], run_fn: Callable,
              metric: str = 'student_accuracy', log=print) -> Dict[int, float]:
    """Run ``run_fn(config_with_seed, seed_workdir)`` for every seed without a results.json, and
    return {seed: metric}."""
    values = {}
    for seed in seeds:
        directory = seed_workdir(workdir, seed)
        if os.path.exists(os.path.join(directory, 'results.json')):
            log(f'seed {seed}: results.json exists in {directory}, not run again')
        else:
            seeded = copy.deepcopy(config)
            seeded.seed = seed
            log(f'seed {seed}: running in {directory}')
            run_fn(seeded, directory)
        values[seed] = read_result(directory, metric, seed, config)
    return values


def summary_lines(values: Dict[int, float], metric: str, workdir: str) -> Sequence[str]:
    lines = [f'  seed {seed}: {100 * value:.2f}  ({seed_workdir(workdir, seed)}/results.json)'
             for seed, value in values.items()]
    seeds = ', '.join(str(s) for s in values)
    lines.append(f'{metric} over seeds {seeds}: {format_mean_std(list(values.values()))}  '
                 f'(%, mean +- population std, ddof={DDOF})')
    return lines


def write_summary(workdir: str, values: Dict[int, float], metric: str) -> str:
    mean, std = mean_std([100 * v for v in values.values()])
    path = os.path.join(workdir, 'seeds.json')
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump({'metric': metric, 'values': {str(k): v for k, v in values.items()},
                   'mean_percent': mean, 'std_percent': std, 'std_ddof': DDOF,
                   'formatted': format_mean_std(list(values.values()))}, f, indent=2)
    os.replace(path + '.tmp', path)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
        summarise_seeds()
    except errors.UserError as error:
        errors.exit_for_people(error, FLAGS.verbose)


def summarise_seeds():
    import jax
    launch.setup_logging()
    config = FLAGS.config
    config_path = config_flags.get_config_filename(FLAGS['config'])
    workdir = FLAGS.workdir or launch.default_workdir(config, config_path)
    seeds = [int(s) for s in FLAGS.seeds]
    methods.resolve(config, launch.overridden_fields(sys.argv[1:]))  # --config.method's preset
    validation.check(config, workdir)  # every field and the workdir, before any seed runs
    if config.job == 'zero_shot':
        launch.train_teacher_if_missing(config, config_path)
    values = run_seeds(config, workdir, seeds, launch.run_job, FLAGS.metric)
    lines = summary_lines(values, FLAGS.metric, workdir)
    if jax.process_index() == 0:
        lines.append(f'summary written to {write_summary(workdir, values, FLAGS.metric)}')
    print('\n'.join(lines))


if __name__ == '__main__':
    flags.mark_flags_as_required(['config'])
    cli.run(main)  # --config from any directory, an unknown --config.FIELD named early
