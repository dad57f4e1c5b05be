"""The errors a person can meet: status 2, the message, no traceback. Through run.py for the
override check (before JAX starts), through ``launch.main`` (what run.py calls) for the rest."""
import json
import os

import numpy as np
import pytest

from conftest import write_teacher
from test_run import run_py
from tiny_config import tiny_zero_shot_config


def assert_error_for_people(returncode, stderr, *fragments):
    assert returncode == 2, stderr[-4000:]
    assert 'Traceback' not in stderr, stderr[-4000:]
    assert [line for line in stderr.splitlines() if line.startswith('Error: ')], stderr[-4000:]
    for fragment in fragments:
        assert fragment in stderr, (fragment, stderr[-4000:])


def launch_main(capsys, config, workdir, monkeypatch):
    """launch.main as run.py calls it: (exit status, stderr). (Its logging set-up would attach a
    handler to pytest's captured stdout, which later tests would write to once it is closed.)"""
    from zskt_jax import launch
    monkeypatch.setattr(launch, 'setup_logging', lambda: None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        launch.main(config, 'configs/tiny.py', str(workdir))
    return exit_.value.code, capsys.readouterr().err


def test_unknown_field_and_the_verbose_traceback():
    args = ('--config=configs/digits.py', '--config.student.widht=2')
    result = run_py(*args)
    assert_error_for_people(result.returncode, result.stderr,
                            "Unknown config field 'student.widht'", 'arch, base_width')
    verbose = run_py(*args, '--verbose')
    assert verbose.returncode != 0
    assert 'Traceback' in verbose.stderr and 'ConfigError' in verbose.stderr


def test_missing_teacher(tmp_path, digits_data_dir, capsys, monkeypatch):
    config = tiny_zero_shot_config(digits_data_dir, str(tmp_path / 'nowhere'))
    assert_error_for_people(*launch_main(capsys, config, tmp_path / 'run', monkeypatch),
                            f'No teacher checkpoint at {tmp_path / "nowhere"}',
                            'python run.py --config=configs/teacher_digits.py')


def test_corrupted_teacher_names_the_path_and_the_command_that_remakes_it(
        tmp_path, digits_data_dir, capsys, monkeypatch):
    teacher = write_teacher(str(tmp_path / 'teacher'))
    # Truncate every data file of the teacher's Orbax checkpoint (as an interrupted copy would).
    data_files = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(teacher, 'variables'))
                  for f in files if os.path.getsize(os.path.join(d, f)) > 1000]
    assert data_files
    for path in data_files:
        with open(path, 'r+b') as f:
            f.truncate(os.path.getsize(path) // 3)
    config = tiny_zero_shot_config(digits_data_dir, teacher)
    assert_error_for_people(*launch_main(capsys, config, tmp_path / 'run', monkeypatch),
                            f'The teacher at {teacher} cannot be read', 'Remake it with:',
                            'python run.py --config=configs/teacher_digits.py')


def test_dataset_not_prepared(tmp_path, capsys, monkeypatch):
    from configs import teacher_svhn
    config = teacher_svhn.get_config()
    config.data_dir = str(tmp_path)
    assert_error_for_people(*launch_main(capsys, config, tmp_path / 'run', monkeypatch),
                            "'svhn_cropped'", f"tfds.builder('svhn_cropped', data_dir='{tmp_path}')")


def test_checkpoint_of_another_configuration(tmp_path, digits_data_dir, tiny_teacher, capsys,
                                             monkeypatch):
    from zskt_jax import checkpoints
    workdir = tmp_path / 'run'
    # A checkpoint written with another student learning rate (its record is checked before its
    # states are read, so a placeholder state suffices).
    other = tiny_zero_shot_config(digits_data_dir, tiny_teacher, student_lr=0.5).to_dict()
    written = checkpoints.RunCheckpoints(str(workdir / 'checkpoints'), keep=2, async_save=False)
    written.save(2, {'placeholder': np.zeros(1)}, {'config': json.loads(json.dumps(other)),
                                                   'iteration': 2})
    written.close()
    config = tiny_zero_shot_config(digits_data_dir, tiny_teacher)
    assert_error_for_people(*launch_main(capsys, config, workdir, monkeypatch),
                            f'The checkpoint at {workdir / "checkpoints"}/2 was written by another '
                            'configuration', 'student_lr: checkpoint 0.5')
