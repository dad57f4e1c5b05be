"""End to end through run.py: a tiny digits distillation, and the errors a person can meet."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, read_events, tiny_zero_shot_config, write_teacher
from tiny_config import write_config_file

def run_py(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_distillation_writes_results_and_tensorboard(tmp_path, digits_data_dir, tiny_teacher):
    config_path = write_config_file(tmp_path / 'tiny.py', digits_data_dir, tiny_teacher)
    workdir = tmp_path / 'run'
    result = run_py(f'--config={config_path}', f'--workdir={workdir}', '--config.n_s=1')
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'it/s' in result.stdout and 'ETA' in result.stdout
    # TensorFlow's start-up lines (one about its own oneDNN use) are kept out of the output.
    assert 'oneDNN custom operations' not in result.stderr and 'absl::' not in result.stderr
    results = json.loads((workdir / 'results.json').read_text())
    assert 0.0 <= results['student_accuracy'] <= 1.0
    assert 0.0 <= results['teacher_accuracy'] <= 1.0
    assert results['iterations'] == 3 and results['config']['n_s'] == 1  # the override reached it
    assert (results['backend'], results['convolution'], results['weight_grad_chunk']) == (
        'cpu', 'xla', results['config']['weight_grad_chunk'])
    assert [h['iteration'] for h in results['history']] == [2, 3]
    assert results['wall_time_s'] > 0
    final = results['history'][-1]
    assert len(final['per_class_accuracy']) == 10
    # The classes never predicted are those with no prediction at all, so they score 0 recall.
    assert all(final['per_class_accuracy'][k] == 0 for k in final['classes_never_predicted'])
    assert ('never predicts class' in result.stderr + result.stdout) == bool(
        results['history'][0]['classes_never_predicted'] or final['classes_never_predicted'])
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '3']

    assert len(glob.glob(str(workdir / 'tensorboard' / 'events.out.tfevents.*'))) == 1
    events = read_events(str(workdir / 'tensorboard'))
    for tag in ('train/generator_loss', 'train/student_loss', 'train/kl', 'train/student_lr',
                'train/teacher_max_prob', 'eval/student_accuracy', 'eval/teacher_accuracy',
                'generated'):
        assert tag in events, tag
    width, height, png = events['generated'][-1][1]  # tf.summary.image: width, height, PNGs
    assert png.startswith(b'\x89PNG')
    assert [step for step, _ in events['eval/student_accuracy']] == [2, 3]
    assert math.isclose(events['eval/student_accuracy'][-1][1], results['student_accuracy'],
                        rel_tol=1e-6)


def test_unknown_config_field_is_named():
    result = run_py('--config=configs/digits.py', '--config.student.widht=2')
    assert result.returncode != 0
    assert "Unknown config field 'student.widht'" in result.stderr
    assert 'arch, base_width' in result.stderr


def test_missing_teacher_says_where_and_how(tmp_path, digits_data_dir):
    from zskt_jax import checkpoints, zero_shot
    config = tiny_zero_shot_config(digits_data_dir, str(tmp_path / 'nowhere'))
    with pytest.raises(checkpoints.TeacherNotFoundError) as error:
        zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))
    message = str(error.value)
    assert str(tmp_path / 'nowhere') in message
    assert 'python run.py --config=configs/teacher_digits.py' in message


def test_teacher_of_another_dataset_is_refused(tmp_path, digits_data_dir):
    from zskt_jax import checkpoints, zero_shot
    teacher = write_teacher(str(tmp_path / 'teacher100'), num_classes=100, dataset='cifar100')
    config = tiny_zero_shot_config(digits_data_dir, teacher)
    with pytest.raises(checkpoints.CheckpointMismatchError, match='100 classes but the dataset has 10'):
        zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))
    teacher = write_teacher(str(tmp_path / 'teacher_small'), image_shape=(16, 16, 3))
    config = tiny_zero_shot_config(digits_data_dir, teacher)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r'\(16, 16, 3\)'):
        zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))


def test_non_finite_loss_stops_and_keeps_the_last_good_states(tmp_path, digits_data_dir,
                                                               tiny_teacher):
    from zskt_jax import zero_shot
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher)
    config.student_lr = float('inf')
    workdir = tmp_path / 'run'
    with pytest.raises(zero_shot.NonFiniteLossError, match='iteration 1:') as error:
        zero_shot.train_and_evaluate(config, str(workdir))
    # The first student update makes the parameters non-finite, so iteration 1's losses are;
    # the states before it (the initial ones) are saved and no results.json claims success.
    assert os.path.join(str(workdir), 'checkpoints', '0') in str(error.value)
    assert os.path.isdir(workdir / 'checkpoints' / '0')
    assert not (workdir / 'results.json').exists()


def test_non_finite_iteration_between_metric_reads_saves_the_states_before_it(
        tmp_path, digits_data_dir, tiny_teacher, monkeypatch):
    """The loop reads the metrics back only every log_every_iterations; a NaN at iteration 3,
    read at iteration 5, still stops the run with the states after iteration 2 saved, equal to
    those of a run stopped there."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from zskt_jax import zero_shot
    real = zero_shot.make_iteration_fn

    def poisoned_at_iteration_3(models, config, mesh, donate=False):
        step = real(models, config, mesh, donate)

        def iteration_fn(state, teacher_variables, z_key):
            poisoned = state.student.step == 2  # the third iteration (a function of the state)
            state, metrics = step(state, teacher_variables, z_key)
            nan = lambda x: jnp.where(poisoned, jnp.nan, x)
            student = state.student.replace(params=jax.tree.map(nan, state.student.params))
            return state.replace(student=student), dict(metrics, kl=nan(metrics['kl']))
        return iteration_fn

    every_5 = dict(log_every_iterations=5, eval_every_iterations=5, checkpoint_every_iterations=5)
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher, num_iterations=6, **every_5)
    monkeypatch.setattr(zero_shot, 'make_iteration_fn', poisoned_at_iteration_3)
    with pytest.raises(zero_shot.NonFiniteLossError, match='iteration 3:') as error:
        zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))
    assert os.path.join(str(tmp_path / 'run'), 'checkpoints', '2') in str(error.value)
    monkeypatch.setattr(zero_shot, 'make_iteration_fn', real)
    stopped = tiny_zero_shot_config(digits_data_dir, tiny_teacher, num_iterations=6, **every_5,
                                    stop_after_iterations=2)
    assert zero_shot.train_and_evaluate(stopped, str(tmp_path / 'stopped'))['stopped_at'] == 2
    read = lambda run: ocp.StandardCheckpointer().restore(
        str(tmp_path / run / 'checkpoints' / '2' / 'state'))
    saved, reference = read('run'), read('stopped')
    assert jax.tree.structure(saved) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_zero_shot_iterations_transfer_nothing_between_host_and_device(
        tmp_path, digits_data_dir, tiny_teacher, monkeypatch):
    """Between the points where the loop reads metrics back, an iteration moves no data between
    host and device (every implicit transfer is an error under the guard)."""
    import jax
    from zskt_jax import zero_shot
    real = zero_shot.make_iteration_fn
    calls = []

    def guarded(*args, **kwargs):
        step = real(*args, **kwargs)

        def iteration_fn(*inputs):
            calls.append(1)
            with jax.transfer_guard('disallow'):
                return step(*inputs)
        return iteration_fn

    monkeypatch.setattr(zero_shot, 'make_iteration_fn', guarded)
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher, num_iterations=4,
                                   log_every_iterations=4, eval_every_iterations=4,
                                   checkpoint_every_iterations=4)
    results = zero_shot.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['iterations'] == 4 and len(calls) == 4


def test_teacher_recipe_gets_the_data_and_teacher_of_the_config_that_asks(tmp_path, monkeypatch):
    """The recipe trains the teacher the distillation will load: the config's dataset, data
    dir, teacher network, precision and convolutions replace the recipe's own; the recipe's
    path ('configs/teacher_digits.py') is found in the configs package whatever the current directory
    (tests/test_install.py: next to the config file that names it)."""
    from zskt_jax import launch
    from configs import digits
    config = digits.get_config()
    config.dataset = 'digits'  # the 32x32 builder config, beside the default's 16x16
    config.data_dir = str(tmp_path / 'tfds')
    config.teacher.arch, config.teacher.base_width = 'WRN-10-2', 16
    config.compute_dtype = 'bfloat16'
    config.convolution = 'xla'  # the recipe's own is 'onednn'
    config.teacher.checkpoint = 'elsewhere/my_teacher'  # not ending in /teacher
    monkeypatch.chdir(tmp_path)
    teacher_config = launch.teacher_recipe_config(config)
    assert teacher_config.job == 'teacher'
    assert (teacher_config.dataset, teacher_config.data_dir) == ('digits', str(tmp_path / 'tfds'))
    assert (teacher_config.teacher.arch, teacher_config.teacher.base_width) == ('WRN-10-2', 16)
    assert (teacher_config.compute_dtype, teacher_config.convolution) == ('bfloat16', 'xla')
    # The teacher is written where the distillation will read it.
    assert teacher_config.teacher.checkpoint == 'elsewhere/my_teacher'
    # Everything else is the recipe's (configs/teacher_digits.py).
    assert (teacher_config.epochs, teacher_config.augment) == (30, 'crop')

    ran = []
    monkeypatch.setattr(launch, 'run_job', lambda c, workdir: ran.append((c, workdir)))
    launch.train_teacher_if_missing(config)
    [(recipe_config, workdir)] = ran
    assert recipe_config.teacher.checkpoint == 'elsewhere/my_teacher'
    assert workdir == str(tmp_path / 'elsewhere')
