"""scripts/plot_runs.py: variants read from results.json files, the table's numbers, the figure."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'scripts'))
import plot_runs  # noqa: E402


def write_results(path, seed, accuracies, never=(), wall=100.0):
    """A single-seed zero-shot results.json with evaluations every 10 iterations."""
    os.makedirs(path, exist_ok=True)
    history = [{'iteration': 10 * (i + 1), 'student_accuracy': a, 'wall_time_s': wall * (i + 1),
                'classes_never_predicted': list(never) if i == len(accuracies) - 1 else []}
               for i, a in enumerate(accuracies)]
    with open(os.path.join(path, 'results.json'), 'w') as f:
        json.dump({'history': history, 'seeds': [seed], 'config': {'seed': seed},
                   'wall_time_s': wall * len(accuracies), 'teacher_accuracy': 0.99,
                   'student_accuracy': accuracies[-1]}, f)


def test_table_and_figure_from_seed_workdirs(tmp_path):
    write_results(tmp_path / 'paper' / 'seed_0', 0, [0.2, 0.9], wall=10)
    write_results(tmp_path / 'paper' / 'seed_1', 1, [0.1, 0.5], never=(3, 7), wall=20)
    write_results(tmp_path / 'default' / 'seed_0', 0, [0.5, 0.97], wall=30)
    # A num_seeds = 2 run: one results.json holding both seeds.
    os.makedirs(tmp_path / 'vmapped')
    with open(tmp_path / 'vmapped' / 'results.json', 'w') as f:
        json.dump({'seeds': [4, 5], 'wall_time_s': 50.0, 'teacher_accuracy': 0.99,
                   'config': {'seed': 4},
                   'history': [{'iteration': 10, 'wall_time_s': 50.0,
                                'student_accuracy_per_seed': [0.8, 0.6],
                                'classes_never_predicted_per_seed': [[], [1]]}]}, f)
    variants = plot_runs.parse_variants([f'paper={tmp_path / "paper"}',
                                         f'default={tmp_path / "default"}',
                                         f'vmapped={tmp_path / "vmapped"}'])
    assert [run.seed for run in variants['paper']] == [0, 1]
    assert [run.seed for run in variants['vmapped']] == [4, 5]
    lines = plot_runs.table(variants).splitlines()
    assert lines[0].startswith('| variant | seed 0 | seed 1 | seed 4 | seed 5 |')
    # Seeds 0 and 1: 90% and 50%, mean 70 +- 20 (population std); seed 1 never predicts 3, 7.
    assert lines[2] == ('| paper | 90.00 | 50.00 | - | - | 70.00 +- 20.00 | seed 1: 3,7 | 30 |')
    assert lines[3] == '| default | 97.00 | - | - | - | 97.00 +- 0.00 | none | 60 |'
    assert lines[4] == '| vmapped | - | - | 80.00 | 60.00 | 70.00 +- 10.00 | seed 5: 1 | 50 |'
    out = tmp_path / 'figure.png'
    plot_runs.plot(variants, str(out))
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_directory_without_results_is_a_message_not_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'plot_runs.py'),
                             f'--out={tmp_path / "x.png"}', f'nothing={tmp_path}'],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert 'holds no results.json' in result.stderr and 'Traceback' not in result.stderr
    with pytest.raises(Exception, match='NAME=DIR'):
        plot_runs.parse_variants(['no-equals-sign'])
