"""The errors a person can meet through run.py: status 2, the message, no traceback."""
import json
import os

import numpy as np

from conftest import write_teacher
from test_run import run_py
from tiny_config import tiny_zero_shot_config, write_config_file


def assert_error_for_people(result, *fragments):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert 'Traceback' not in result.stderr, result.stderr[-4000:]
    assert [line for line in result.stderr.splitlines() if line.startswith('Error: ')], (
        result.stderr[-4000:])
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr[-4000:])


def test_unknown_field_and_the_verbose_traceback():
    args = ('--config=configs/digits.py', '--config.student.widht=2')
    assert_error_for_people(run_py(*args), "Unknown config field 'student.widht'",
                            'arch, base_width')
    verbose = run_py(*args, '--verbose')
    assert verbose.returncode != 0
    assert 'Traceback' in verbose.stderr and 'ConfigError' in verbose.stderr


def test_missing_teacher(tmp_path, digits_data_dir):
    config = write_config_file(tmp_path / 'tiny.py', digits_data_dir, str(tmp_path / 'nowhere'))
    assert_error_for_people(run_py(f'--config={config}', f'--workdir={tmp_path / "run"}'),
                            f'No teacher checkpoint at {tmp_path / "nowhere"}',
                            'python run.py --config=configs/teacher_digits.py')


def test_corrupted_teacher_names_the_path_and_the_command_that_remakes_it(tmp_path,
                                                                         digits_data_dir):
    teacher = write_teacher(str(tmp_path / 'teacher'))
    # Truncate every data file of the teacher's Orbax checkpoint (as an interrupted copy would).
    data_files = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(teacher, 'variables'))
                  for f in files if os.path.getsize(os.path.join(d, f)) > 1000]
    assert data_files
    for path in data_files:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 3)
    config = write_config_file(tmp_path / 'tiny.py', digits_data_dir, teacher)
    assert_error_for_people(run_py(f'--config={config}', f'--workdir={tmp_path / "run"}'),
                            f'The teacher at {teacher} cannot be read', 'Remake it with:',
                            'python run.py --config=configs/teacher_digits.py')


def test_dataset_not_prepared(tmp_path):
    assert_error_for_people(
        run_py('--config=configs/teacher_svhn.py', f'--config.data_dir={tmp_path}',
               f'--workdir={tmp_path / "run"}'),
        "'svhn_cropped'", f"tfds.builder('svhn_cropped', data_dir='{tmp_path}')")


def test_checkpoint_of_another_configuration(tmp_path, digits_data_dir, tiny_teacher):
    from zskt_jax import checkpoints
    workdir = tmp_path / 'run'
    # A checkpoint written with another student learning rate (its record is checked before its
    # states are read, so a placeholder state suffices).
    other = tiny_zero_shot_config(digits_data_dir, tiny_teacher, student_lr=0.5).to_dict()
    written = checkpoints.RunCheckpoints(str(workdir / 'checkpoints'), keep=2, async_save=False)
    written.save(2, {'placeholder': np.zeros(1)}, {'config': json.loads(json.dumps(other)),
                                                   'iteration': 2})
    written.close()
    config = write_config_file(tmp_path / 'tiny.py', digits_data_dir, tiny_teacher)
    assert_error_for_people(run_py(f'--config={config}', f'--workdir={workdir}'),
                            f'The checkpoint at {workdir / "checkpoints"}/2 was written by another '
                            'configuration', 'student_lr: checkpoint 0.5')
