"""Orbax checkpoints of the zero-shot job: exact resumption, clean stops, refused checkpoints.

The runs are configs/digits.py (its stabilisers and replay memory on) at tiny sizes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from zskt_jax import checkpoints, zero_shot

from configs import digits
from conftest import ROOT, tiny_zero_shot_config as tiny_paper_config

# The stabilisers of configs/digits.py, which run_py runs, with a replay memory of 4 tiny
# batches: the in-process runs below continue its checkpoints, so they run them too, and its
# convolutions.
DEFAULT_STABILISERS = dict(
    {field: digits.get_config()[field] for field in zero_shot.Stabilisers._fields},
    replay_size=64, replay_batch=8)


def tiny_zero_shot_config(data_dir, teacher):
    return tiny_paper_config(data_dir, teacher, convolution=digits.get_config().convolution,
                             **DEFAULT_STABILISERS)


TINY = ['--config.dataset=digits', '--config.teacher.arch=WRN-10-1', '--config.teacher.base_width=4',
        "--config.teacher.recipe=", '--config.student.arch=WRN-10-1',
        '--config.student.base_width=4', '--config.generator.hidden=8', '--config.batch_size=16',
        '--config.n_s=2', '--config.eval_every_iterations=2', '--config.log_every_iterations=1',
        '--config.checkpoint_every_iterations=2',
        *(f'--config.{field}={value}' for field, value in DEFAULT_STABILISERS.items())]


def run_py(workdir, data_dir, teacher, *extra, env=None, wait=True):
    args = [sys.executable, os.path.join(ROOT, 'run.py'), '--config=configs/digits.py',
            f'--workdir={workdir}', f'--config.data_dir={data_dir}',
            f'--config.teacher.checkpoint={teacher}', *TINY, *extra]
    env = dict(os.environ, **(env or {}))
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def final_states(workdir):
    """The newest checkpoint's raw arrays (generator and student: params, stats, Adam moments)."""
    import orbax.checkpoint as ocp
    directory = os.path.join(workdir, 'checkpoints')
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, str(step), 'state'))
    return step, restored


def assert_trees_equal(a, b, atol=0.0):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        if atol:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, digits_data_dir, tiny_teacher):
    """4 iterations without interruption (the reference)."""
    workdir = str(tmp_path_factory.mktemp('straight'))
    run_py(workdir, digits_data_dir, tiny_teacher, '--config.num_iterations=4')
    return workdir


def test_resume_after_process_exit_is_bitwise_identical(tmp_path, straight_run, digits_data_dir,
                                                        tiny_teacher):
    workdir = str(tmp_path / 'resumed')
    out = run_py(workdir, digits_data_dir, tiny_teacher, '--config.num_iterations=4',
                 '--config.stop_after_iterations=2')
    assert 'Stopped after iteration 2' in out and not os.path.exists(f'{workdir}/results.json')
    out = run_py(workdir, digits_data_dir, tiny_teacher, '--config.num_iterations=4')
    assert 'Resumed from' in out
    step_a, a = final_states(straight_run)
    step_b, b = final_states(workdir)
    assert step_a == step_b == 4
    # configs/digits.py runs its stabilisers: the replay memory is checkpointed state too.
    assert a['replay'].shape[0] == 64 and np.any(a['replay'])
    assert_trees_equal(a, b)  # parameters, batch statistics, optimizer states, memory, bitwise
    results_a = json.load(open(f'{straight_run}/results.json'))
    results_b = json.load(open(f'{workdir}/results.json'))
    assert results_a['final_train_metrics'] == results_b['final_train_metrics']
    assert results_a['history'][-1]['student_accuracy'] == results_b['history'][-1]['student_accuracy']
    # Time to accuracy continues across the resume: the second process starts from the time the
    # iteration-2 checkpoint recorded, so the history's wall times keep increasing.
    run_checkpoints = checkpoints.RunCheckpoints(f'{workdir}/checkpoints', keep=3)
    stopped_at = run_checkpoints.restore_meta(2)
    run_checkpoints.close()
    times = [entry['wall_time_s'] for entry in results_b['history']]
    assert [entry['iteration'] for entry in results_b['history']] == [2, 4]
    assert 0 < times[0] <= stopped_at['wall_time_s'] < times[1] <= results_b['wall_time_s']


def test_run_clock_continues_from_the_checkpoint():
    from zskt_jax.reporting import RunClock
    clock = RunClock()
    assert 0 <= clock() < 60
    clock.resume({'wall_time_s': 1000.0, 'history': [{'wall_time_s': 900.0}]})
    assert 1000 <= clock() < 1060
    clock.resume({'history': [{'wall_time_s': 10.0}, {'wall_time_s': 900.0}]})  # older meta
    assert 900 <= clock() < 960
    clock.resume({'history': []})
    assert 0 <= clock() < 60


def test_sigterm_stops_cleanly_and_the_rerun_matches(tmp_path, straight_run, digits_data_dir,
                                                     tiny_teacher):
    workdir = str(tmp_path / 'preempted')
    process = run_py(workdir, digits_data_dir, tiny_teacher, '--config.num_iterations=4',
                     '--config.log_every_iterations=1', wait=False)
    lines = []
    for line in process.stdout:  # wait until training is under way
        lines.append(line)
        if '[1/4]' in line:
            process.send_signal(signal.SIGTERM)
            break
    output = ''.join(lines) + process.stdout.read()
    assert process.wait(timeout=300) == 0, output[-3000:]
    assert 'Received SIGTERM' in output and 'checkpoint written to' in output
    steps = [d for d in os.listdir(f'{workdir}/checkpoints') if d.isdigit()]
    assert steps, output
    run_py(workdir, digits_data_dir, tiny_teacher, '--config.num_iterations=4')
    assert_trees_equal(final_states(straight_run)[1], final_states(workdir)[1])


def test_checkpoint_of_another_configuration_is_refused(tmp_path, straight_run, digits_data_dir,
                                                        tiny_teacher):
    workdir = str(tmp_path / 'copy')
    shutil.copytree(straight_run, workdir)
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher)
    config.num_iterations = 4
    config.student.base_width = 8  # another student width
    with pytest.raises(checkpoints.CheckpointMismatchError) as error:
        zero_shot.train_and_evaluate(config, workdir)
    assert 'student.base_width: checkpoint 4, now 8' in str(error.value)
    assert sorted(os.listdir(f'{workdir}/checkpoints')) == ['2', '4']


def test_corrupted_latest_checkpoint_is_reported_and_fallback_needs_asking(
        tmp_path, straight_run, digits_data_dir, tiny_teacher):
    workdir = str(tmp_path / 'corrupt')
    shutil.copytree(straight_run, workdir)
    os.remove(f'{workdir}/results.json')
    # Truncate every data file of the newest checkpoint's state.
    for root, _, files in os.walk(f'{workdir}/checkpoints/4/state'):
        for name in files:
            with open(os.path.join(root, name), 'r+b') as f:
                f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher)
    config.num_iterations = 4
    with pytest.raises(checkpoints.CheckpointCorruptedError) as error:
        zero_shot.train_and_evaluate(config, workdir)
    assert 'checkpoints/4 cannot be read' in str(error.value)
    assert 'resume_fallback' in str(error.value)
    assert sorted(os.listdir(f'{workdir}/checkpoints')) == ['2', '4']  # nothing deleted

    config.resume_fallback = True
    results = zero_shot.train_and_evaluate(config, workdir)
    assert results['iterations'] == 4
    assert os.path.isdir(f'{workdir}/checkpoints/4.corrupted')  # moved aside, not deleted
    assert_trees_equal(final_states(straight_run)[1], final_states(workdir)[1])


def test_changed_teacher_is_refused(tmp_path, straight_run, digits_data_dir):
    from conftest import write_teacher
    workdir = str(tmp_path / 'other_teacher')
    shutil.copytree(straight_run, workdir)
    other = write_teacher(str(tmp_path / 'teacher_seed1'), seed=1)
    config = tiny_zero_shot_config(digits_data_dir, other)
    config.num_iterations = 4
    with pytest.raises(checkpoints.CheckpointMismatchError, match='is not the one this run started'):
        zero_shot.train_and_evaluate(config, workdir)


def test_interrupted_save_leaves_earlier_checkpoints_usable(tmp_path, straight_run):
    """Orbax writes into a temporary directory and renames it when complete: a crash mid-save
    leaves such a directory, which is never taken for a checkpoint."""
    workdir = str(tmp_path / 'crashed')
    shutil.copytree(straight_run, workdir)
    partial = f'{workdir}/checkpoints/6.orbax-checkpoint-tmp-1234'
    shutil.copytree(f'{workdir}/checkpoints/4', partial)
    os.remove(os.path.join(partial, 'commit_success.txt')) if os.path.exists(
        os.path.join(partial, 'commit_success.txt')) else None
    manager = checkpoints.RunCheckpoints(f'{workdir}/checkpoints', keep=3)
    assert manager.latest_step() == 4
    assert manager.restore_meta(4)['iteration'] == 4
    manager.close()
