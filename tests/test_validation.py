"""Bad input of every kind ends in a clear message and exit status 2, with no traceback: the config
checked field by field before any work (zskt_jax/validation.py), a workdir that cannot be
written, and corrupted teacher and run checkpoints (through run.py, as a person meets them)."""
import os

import pytest

from conftest import ROOT, write_teacher
from test_run import run_py
from tiny_config import tiny_zero_shot_config, write_config_file

from zskt_jax import errors, validation


def config_of(name, **overrides):
    from zskt_jax import launch
    config = launch.load_config_file(os.path.join(ROOT, 'configs', f'{name}.py'))
    for dotted, value in overrides.items():
        *sections, field = dotted.split('.')
        node = config
        for section in sections:
            node = node[section]
        node[field] = value
    return config


def bad_fields(config, devices=1):
    """The fields named by the problems of ``config`` (the text before ' = ' or ' is missing')."""
    return [p.split(' ', 1)[0][len('config.'):] for p in validation.problems_of(config, devices)]


# ----------------------------------------------------------------------------------------------
# The rules

@pytest.mark.parametrize('name', [
    'default', 'digits', 'digits_paper', 'svhn', 'cifar10', 'cifar100',
    'teacher_default', 'teacher_digits', 'teacher_svhn', 'teacher_cifar10', 'teacher_cifar100',
    'few_shot_default', 'few_shot_digits', 'few_shot_svhn', 'few_shot_cifar10', 'belief_digits'])
def test_every_config_of_the_project_passes(name):
    for devices in (1, 8):
        assert validation.problems_of(config_of(name), devices) == []


@pytest.mark.parametrize('name, overrides, fields', [
    ('digits', {'batch_size': 0, 'num_iterations': -5}, ['num_iterations', 'batch_size']),
    ('digits', {'n_g': 0, 'n_s': -1, 'generator.hidden': 0, 'student.base_width': -1},
     ['student.base_width', 'generator.hidden', 'n_g', 'n_s']),
    ('digits', {'beta': -1.0, 'bn_weight': -0.1, 'student_lr': 0.0, 'generator_lr': float('nan')},
     ['generator_lr', 'student_lr', 'beta', 'bn_weight']),
    ('digits', {'compute_dtype': 'float16', 'update_loop': 'loop', 'dataset': 'mnist',
                'teacher.arch': 'WRN-12-1', 'adversarial_loss': 'js'},
     ['dataset', 'teacher.arch', 'compute_dtype', 'adversarial_loss', 'update_loop']),
    ('digits', {'log_every_iterations': 0, 'eval_every_iterations': -1,
                'checkpoint_every_iterations': 0, 'stop_after_iterations': -1,
                'keep_checkpoints': 0, 'num_seeds': 0, 'weight_grad_chunk': -8},
     ['log_every_iterations', 'checkpoint_every_iterations', 'stop_after_iterations',
      'keep_checkpoints', 'weight_grad_chunk', 'eval_every_iterations', 'num_seeds']),
    ('teacher_digits', {'epochs': 0, 'learning_rate': -0.1, 'momentum': 1.0, 'augment': 'flip',
                        'lr_milestones': (0.3, 1.5), 'log_every_epochs': 0},
     ['learning_rate', 'momentum', 'lr_milestones', 'augment', 'log_every_epochs', 'epochs']),
    ('few_shot_digits', {'images_per_class': 0, 'alpha': 1.5, 'temperature': 0.0,
                         'full_data_epochs': 0, 'batch_size': -64},
     ['batch_size', 'images_per_class', 'full_data_epochs', 'alpha', 'temperature']),
    ('belief_digits', {'student_workdir': '', 'num_steps': 0, 'step_size': -1.0,
                       'student_step': -2, 'attack_loop': 'loop', 'num_images': 0},
     ['student_workdir', 'student_step', 'num_images', 'num_steps', 'step_size', 'attack_loop']),
])
def test_bad_values_are_named_field_by_field(name, overrides, fields):
    assert bad_fields(config_of(name, **overrides)) == fields


def test_the_message_names_the_field_the_value_and_what_is_allowed():
    with pytest.raises(errors.ConfigError) as error:
        validation.validate(config_of('digits', batch_size=0), devices=1)
    assert str(error.value) == 'config.batch_size = 0; it must be a positive integer'
    with pytest.raises(errors.ConfigError) as error:
        validation.validate(config_of('digits', compute_dtype='float16', num_iterations=-5),
                            devices=1)
    assert str(error.value).splitlines() == [
        '2 config fields cannot be used:',
        "  config.compute_dtype = 'float16'; it must be one of 'float32', 'bfloat16'",
        '  config.num_iterations = -5; it must be a positive integer']
    assert "'mnist'; it must be one of 'cifar10', 'cifar100', 'digits', 'digits16', 'svhn'" in (
        validation.problems_of(config_of('digits', dataset='mnist'))[0])


def test_batches_and_the_replay_memory_against_the_devices():
    assert validation.problems_of(config_of('digits_paper', batch_size=100), devices=8) == [
        'config.batch_size = 100 does not divide evenly across the 8 devices of the mesh; '
        'choose a multiple of 8']
    assert bad_fields(config_of('teacher_digits', batch_size=60), devices=8) == ['batch_size']
    assert bad_fields(config_of('few_shot_digits', batch_size=60), devices=8) == ['batch_size']
    assert bad_fields(config_of('belief_digits', batch_size=61), devices=8) == []  # rounded up
    # configs/digits.py: replay_size 8192, replay_batch 128 at batch 128.
    assert validation.problems_of(config_of('digits', replay_size=8000)) == [
        'config.replay_size = 8000 must be a multiple of config.batch_size = 128: every '
        'iteration writes one whole batch into the memory']
    assert 'set both (replay on) or neither (off)' in validation.problems_of(
        config_of('digits', replay_batch=0))[0]
    assert bad_fields(config_of('digits', replay_batch=12), devices=8) == ['replay_batch']
    # A field that failed its own rule is not checked again against the others.
    assert bad_fields(config_of('digits', batch_size=0)) == ['batch_size']


def test_unknown_job_and_missing_fields():
    assert validation.problems_of(config_of('digits', job='distil')) == [
        "config.job = 'distil'; choose one of 'zero_shot', 'teacher', 'few_shot', 'belief'"]
    config = config_of('digits')
    with config.unlocked():
        del config['n_s']
        del config['weight_grad_chunk']  # read with a default: may be left out
    assert validation.problems_of(config) == [
        'config.n_s is missing; it must be a positive integer']


def test_the_choices_are_those_of_the_code():
    from zskt_jax import common, launch, losses
    assert validation.JOBS == tuple(launch.JOBS)
    rules = {rule.field: rule for rule in validation.RULES['zero_shot']}
    assert all(rules['compute_dtype'].ok(name) for name in common.DTYPES)
    assert all(rules['adversarial_loss'].ok(name) for name in losses.ADVERSARIAL_LOSSES)
    assert not rules['compute_dtype'].ok('float16') and not rules['adversarial_loss'].ok('l2')


def test_a_directory_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(errors.UserError, match=r'--workdir=.*a_file/run cannot be created or '
                                               r'written \(NotADirectoryError'):
        validation.check_writable(str(tmp_path / 'a_file' / 'run'))
    validation.check_writable(str(tmp_path / 'new' / 'run'))
    assert os.listdir(tmp_path / 'new' / 'run') == []  # the test file is gone


# ----------------------------------------------------------------------------------------------
# Through run.py: status 2, the message, no traceback anywhere in the output

def assert_clean_error(result, *fragments):
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-4000:]
    assert 'Traceback' not in output, output[-4000:]
    assert [line for line in result.stderr.splitlines() if line.startswith('Error: ')], output
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, output[-4000:])


def test_run_py_zero_batch(tmp_path):
    workdir = tmp_path / 'run'
    result = run_py('--config=configs/digits.py', '--config.batch_size=0', f'--workdir={workdir}')
    assert_clean_error(result, 'config.batch_size = 0; it must be a positive integer')
    assert not workdir.exists()  # failed before anything was made


def test_run_py_negative_iterations(tmp_path):
    workdir = tmp_path / 'run'
    result = run_py('--config=configs/digits.py', '--config.num_iterations=-5',
                    f'--workdir={workdir}')
    assert_clean_error(result, 'config.num_iterations = -5; it must be a positive integer')
    assert not (workdir / 'results.json').exists()


def test_run_py_workdir_that_cannot_be_made(tmp_path):
    (tmp_path / 'a_file').write_text('')
    workdir = '/proc/zskt' if os.path.isdir('/proc/self') else str(tmp_path / 'a_file' / 'run')
    result = run_py('--config=configs/digits.py', f'--workdir={workdir}')
    assert_clean_error(result, f'--workdir={workdir} cannot be created or written')


def corrupt_array_data(directory) -> list:
    """Overwrite the middle half of every file of an Orbax checkpoint's array data (the files
    under its ``d/`` directories), leaving its metadata intact."""
    corrupted = []
    for root, _, files in os.walk(directory):
        if os.path.basename(root) != 'd':
            continue
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, 'r+b') as f:
                f.seek(size // 4)
                f.write(b'\xff' * max(size // 2, 1))
            corrupted.append(path)
    assert corrupted, f'no array data under {directory}'
    return corrupted


def test_run_py_corrupted_teacher(tmp_path, digits_data_dir):
    teacher = write_teacher(str(tmp_path / 'teacher'))
    corrupt_array_data(os.path.join(teacher, 'variables'))
    config_path = write_config_file(tmp_path / 'tiny.py', digits_data_dir, teacher)
    result = run_py(f'--config={config_path}', f'--workdir={tmp_path / "run"}')
    assert_clean_error(result, f'The teacher at {teacher} cannot be read', 'Remake it with:')


def test_run_py_corrupted_run_checkpoint(tmp_path, digits_data_dir, tiny_teacher):
    """The run's checkpoint written as the job writes it (its config and teacher), then its
    array data corrupted: the rerun stops at the restore with the message alone."""
    from zskt_jax import checkpoints, common, loop, parallel, paths, zero_shot
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher)
    models = zero_shot.Models(
        generator=common.build_generator(config),
        student=common.build_network(config.student, 10, config),
        teacher=common.build_network(config.teacher, 10, config))
    state, _ = zero_shot.create_states(config, models, parallel.make_mesh())
    _, teacher_meta = checkpoints.load_teacher(tiny_teacher)
    workdir = tmp_path / 'run'
    run = loop.RunDir(str(workdir), config)
    run.record = {'teacher_path': paths.absolute(tiny_teacher),
                  'teacher_checksum': teacher_meta['checksum']}
    run.save(2, state.state_dict())
    run.stopped('zero_shot', 2)  # waits for the save and closes
    corrupt_array_data(workdir / 'checkpoints' / '2' / 'state')
    config_path = write_config_file(tmp_path / 'tiny.py', digits_data_dir, tiny_teacher)
    result = run_py(f'--config={config_path}', f'--workdir={workdir}')
    assert_clean_error(result, f'The latest checkpoint {workdir}/checkpoints/2 cannot be read',
                       'Nothing was deleted', 'There is no earlier checkpoint')
    assert os.path.isdir(workdir / 'checkpoints' / '2')  # nothing lost


def test_only_the_leftovers_of_a_failed_restore_are_silenced(monkeypatch):
    """What the corrupted-checkpoint runs above rely on, shown directly (those leftovers come
    at random moments): the closed loop's wake-up and asyncio's report of a never-retrieved
    read error of Orbax are dropped; anything else still reaches the hooks."""
    import asyncio
    import logging
    import sys
    import types
    from zskt_jax import checkpoints
    seen = []
    monkeypatch.setattr(sys, 'unraisablehook', seen.append)
    checkpoints.ignore_reads_left_by_a_failed_restore()
    checkpoints.ignore_reads_left_by_a_failed_restore()  # installed once
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError) as closed:
        loop.call_soon_threadsafe(lambda: None)
    other = RuntimeError('Event loop is closed')  # the same words from elsewhere
    for error in (closed.value, other):
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=error,
                                                 exc_traceback=error.__traceback__))
    assert [u.exc_value for u in seen] == [other]

    def raised_in(filename):
        try:
            exec(compile('raise ValueError("DATA_LOSS")', filename, 'exec'))
        except ValueError:
            return sys.exc_info()
    asyncio_logger = logging.getLogger('asyncio')
    record = lambda exc_info: asyncio_logger.makeRecord(
        'asyncio', logging.ERROR, __file__, 1, 'Task exception was never retrieved\nfuture: ...',
        (), exc_info)
    orbax_file = os.path.join(os.sep, 'site-packages', 'orbax', 'serialization.py')
    assert not asyncio_logger.filter(record(raised_in(orbax_file)))
    assert asyncio_logger.filter(record(raised_in('elsewhere.py')))
