"""Test accuracy against iteration and wall time, mean and spread over seeds, per variant, from
the runs' results.json files, each seed's final accuracy, and the table that goes with them.

  python scripts/plot_runs.py --out=docs/images/robustness_digits.png \\
      paper=runs/digits_paper default=runs/digits_seeds

Each NAME=DIR is one variant: DIR holds seed_*/results.json (the layout of scripts/seeds.py) or
a results.json of its own (one seed, or a num_seeds > 1 run, whose seeds are read from it). The
figure has three panels: accuracy against iteration and against wall time, each variant a line
(the mean over seeds) in a band (the lowest and highest seed), and every seed's final accuracy
(a dot each), with the teacher's accuracy and 97% of it. The table (markdown, printed and
written beside the figure as .md) lists every seed's final accuracy, the classes its student
never predicts, mean +- std (population, as scripts/seeds.py) and the wall time.
"""
import glob
import json
import os
import sys
from typing import Dict, List, NamedTuple, Sequence

import numpy as np
from absl import app, flags

flags.DEFINE_string('out', 'runs/plot_runs.png', 'The figure (PNG); the table goes beside it (.md).')
flags.DEFINE_string('title', '', 'The figure title.')
FLAGS = flags.FLAGS


class SeedRun(NamedTuple):
    seed: int
    iterations: np.ndarray       # [E] evaluated iterations
    accuracy: np.ndarray         # [E] test accuracy (fraction)
    wall_time_s: np.ndarray      # [E] run time until that evaluation
    never_predicted: List[int]   # at the final evaluation
    total_wall_time_s: float
    teacher_accuracy: float


def _seed_runs(results: Dict) -> List[SeedRun]:
    """The per-seed evaluation histories of one results.json (one or several seeds)."""
    history = results['history']
    iterations = np.array([h['iteration'] for h in history])
    times = np.array([h['wall_time_s'] for h in history])
    seeds = results.get('seeds') or [results['config']['seed']]
    common = dict(iterations=iterations, wall_time_s=times,
                  total_wall_time_s=results['wall_time_s'],
                  teacher_accuracy=results['teacher_accuracy'])
    if len(seeds) == 1:
        return [SeedRun(seed=seeds[0], accuracy=np.array([h['student_accuracy'] for h in history]),
                        never_predicted=history[-1].get('classes_never_predicted', []), **common)]
    return [SeedRun(seed=seed, accuracy=np.array([h['student_accuracy_per_seed'][i]
                                                  for h in history]),
                    never_predicted=history[-1]['classes_never_predicted_per_seed'][i], **common)
            for i, seed in enumerate(seeds)]


def load_variant(directory: str) -> List[SeedRun]:
    """Every seed run under ``directory`` (seed_*/results.json, or its own results.json)."""
    paths = sorted(glob.glob(os.path.join(directory, 'seed_*', 'results.json')))
    if not paths and os.path.exists(os.path.join(directory, 'results.json')):
        paths = [os.path.join(directory, 'results.json')]
    if not paths:
        raise FileNotFoundError(f'{directory} holds no results.json (nor seed_*/results.json): '
                                'point at a run or scripts/seeds.py workdir that has finished')
    runs = []
    for path in paths:
        with open(path) as f:
            runs.extend(_seed_runs(json.load(f)))
    return sorted(runs, key=lambda run: run.seed)


def _aligned(runs: Sequence[SeedRun], field: str):
    """[seeds, E] of ``field`` over the evaluations every seed has (the shortest history)."""
    length = min(len(run.iterations) for run in runs)
    return np.stack([getattr(run, field)[:length] for run in runs])


def table(variants: Dict[str, List[SeedRun]]) -> str:
    seeds = sorted({run.seed for runs in variants.values() for run in runs})
    header = ('| variant | ' + ' | '.join(f'seed {s}' for s in seeds)
              + ' | mean +- std | never predicted | wall time (s, mean) |')
    lines = [header, '|' + '---|' * (len(seeds) + 4)]
    for name, runs in variants.items():
        by_seed = {run.seed: run for run in runs}
        final = np.array([100 * run.accuracy[-1] for run in runs])
        cells = [f'{100 * by_seed[s].accuracy[-1]:.2f}' if s in by_seed else '-' for s in seeds]
        never = '; '.join(f'seed {run.seed}: {",".join(map(str, run.never_predicted))}'
                          for run in runs if run.never_predicted) or 'none'
        lines.append(f'| {name} | ' + ' | '.join(cells)
                     + f' | {final.mean():.2f} +- {final.std():.2f} | {never} | '
                       f'{np.mean([run.total_wall_time_s for run in runs]):.0f} |')
    return '\n'.join(lines)


def plot(variants: Dict[str, List[SeedRun]], path: str, title: str = '') -> None:
    """Accuracy against iteration and against wall time (mean line, lowest-to-highest band), and
    each seed's final accuracy per variant (a dot per seed), with the teacher and 97% of it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(14, 4.4), dpi=120)
    FigureCanvasAgg(figure)
    by_iteration, by_time, finals = figure.subplots(
        1, 3, gridspec_kw={'width_ratios': [1, 1, 0.28 + 0.12 * len(variants)]})
    for index, (name, runs) in enumerate(variants.items()):
        color = f'C{index % 10}'
        accuracy = 100 * _aligned(runs, 'accuracy')
        iterations = _aligned(runs, 'iterations')[0]
        times = _aligned(runs, 'wall_time_s').mean(axis=0)
        label = f'{name} ({len(runs)} seeds)'
        for axis, x in ((by_iteration, iterations), (by_time, times)):
            axis.plot(x, accuracy.mean(axis=0), color=color, label=label)
            axis.fill_between(x, accuracy.min(axis=0), accuracy.max(axis=0), color=color,
                              alpha=0.15, linewidth=0)
        final = [100 * run.accuracy[-1] for run in runs]
        finals.scatter(np.full(len(final), index) + np.linspace(-0.15, 0.15, len(final)), final,
                       color=color, s=14)
    # The teacher, and 97% of it (the digits default's target), where every run has one teacher.
    teachers = {run.teacher_accuracy for runs in variants.values() for run in runs}
    if len(teachers) == 1:
        teacher = 100 * teachers.pop()
        for axis in (by_iteration, by_time, finals):
            axis.axhline(teacher, color='k', linestyle='--', linewidth=0.8)
            axis.axhline(0.97 * teacher, color='k', linestyle=':', linewidth=0.8)
        finals.set_title(f'final accuracy per seed\nteacher {teacher:.2f}% (dashed), '
                         '97% of it (dotted)', fontsize=8)
    else:
        finals.set_title('final accuracy per seed', fontsize=8)
    by_iteration.set_xlabel('iteration')
    by_time.set_xlabel('wall time (s, mean over seeds)')
    by_iteration.set_ylabel('student test accuracy (%)')
    by_iteration.legend(loc='lower right', fontsize=8)
    for axis in (by_iteration, by_time):
        axis.grid(alpha=0.3)
        axis.set_ylim(0, 100)
    finals.set_xticks(range(len(variants)))
    finals.set_xticklabels(list(variants), rotation=60, ha='right', fontsize=7)
    finals.set_xlim(-0.5, len(variants) - 0.5)
    finals.grid(alpha=0.3, axis='y')
    figure.suptitle(title or 'Mean over seeds (line), lowest to highest seed (band)', fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)


def parse_variants(argv: Sequence[str]) -> Dict[str, List[SeedRun]]:
    variants = {}
    for arg in argv:
        name, sep, directory = arg.partition('=')
        if not sep or not name or not directory:
            raise app.UsageError(f'{arg!r}: give each variant as NAME=DIR')
        variants[name] = load_variant(directory)
    if not variants:
        raise app.UsageError('give at least one NAME=DIR')
    return variants


def main(argv):
    try:
        variants = parse_variants(argv[1:])
    except FileNotFoundError as error:
        sys.exit(str(error))
    plot(variants, FLAGS.out, FLAGS.title)
    text = table(variants)
    with open(os.path.splitext(FLAGS.out)[0] + '.md', 'w') as f:
        f.write(text + '\n')
    print(text)
    print(f'figure written to {FLAGS.out}')


if __name__ == '__main__':
    app.run(main)
