"""Teacher training: the step schedule, augmentation, and a tiny run that resumes exactly."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax import teacher


def tiny_teacher_config(data_dir):
    from configs import teacher_digits
    config = teacher_digits.get_config()
    config.data_dir = data_dir
    config.teacher.arch = 'WRN-10-1'
    config.teacher.base_width = 4
    config.epochs = 2
    config.batch_size = 256
    config.log_every_epochs = 1
    return config


def test_step_learning_rate_divides_by_five_at_30_60_80_percent():
    lrs = [float(teacher.step_learning_rate(0.1, jnp.asarray(e), 100, (0.3, 0.6, 0.8), 0.2))
           for e in (0, 29, 30, 59, 60, 79, 80, 99)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008],
                               rtol=1e-6)


@pytest.mark.parametrize('size, pad', [(32, 4), (16, 2)])
def test_crop_augmentation_shifts_within_an_eighth_of_the_image(size, pad):
    """RandomCrop(32, padding=4) at 32x32 (the paper's); the same proportion, 2 pixels, at 16."""
    images = jnp.arange(8 * size * size * 3, dtype=jnp.int32).reshape(8, size, size, 3) % 251 + 1
    images = images.astype(jnp.uint8)
    out = np.asarray(teacher.augment(jax.random.key(0), images, 'crop'))
    assert out.shape == images.shape
    shifts = set()
    for original, cropped in zip(np.asarray(images), out):
        padded = np.pad(original, ((pad, pad), (pad, pad), (0, 0)))
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(padded[dy:dy + size, dx:dx + size], cropped)]
        assert found
        shifts.update(found)
    assert len(shifts) > 1
    np.testing.assert_array_equal(teacher.augment(jax.random.key(0), images, 'none'), images)


def test_teacher_training_writes_a_teacher_and_resumes_exactly(tmp_path, digits_data_dir):
    from zskt_jax import checkpoints
    config = tiny_teacher_config(digits_data_dir)
    straight = teacher.train_and_evaluate(config, str(tmp_path / 'straight'))
    assert 0 <= straight['teacher_accuracy'] <= 1
    meta = json.loads((tmp_path / 'straight' / 'teacher' / 'teacher.json').read_text())
    assert meta['arch'] == 'WRN-10-1' and meta['num_classes'] == 10

    # Stop after the first epoch's checkpoint (as a preemption would), then resume; this teacher
    # is written where config.teacher.checkpoint says, not in the workdir.
    config_half = tiny_teacher_config(digits_data_dir)
    with config_half.unlocked():
        config_half.epochs = 2
        config_half.teacher.checkpoint = str(tmp_path / 'elsewhere' / 'my_teacher')
    workdir = str(tmp_path / 'resumed')
    first = teacher.train_and_evaluate(_stopping(config_half, 5), workdir)
    assert first['stopped_at'] == 5
    resumed = teacher.train_and_evaluate(config_half, workdir)
    assert resumed['teacher_path'] == str(tmp_path / 'elsewhere' / 'my_teacher')
    assert not (tmp_path / 'resumed' / 'teacher').exists()
    a, _ = checkpoints.load_teacher(str(tmp_path / 'straight' / 'teacher'))
    b, _ = checkpoints.load_teacher(str(tmp_path / 'elsewhere' / 'my_teacher'))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed['teacher_accuracy'] == straight['teacher_accuracy']


def _stopping(config, steps):
    """The config with a stop requested after ``steps`` optimizer steps."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.stop_after_steps = steps
    return config


def test_progress_line_counts_epochs_in_epochs(monkeypatch):
    """The teacher's progress line says epochs (it counts steps, steps_per_epoch to an epoch)."""
    from zskt_jax import reporting
    clock = iter([0.0, 2.0, 102.0])
    monkeypatch.setattr(reporting.time, 'perf_counter', lambda: next(clock))
    progress = reporting.Progress(0, 30 * 10, steps_per_unit=10, unit='epoch')
    assert progress.line(50, {'loss': 0.5}).startswith('epoch 5/30, 2.50 epochs/s, ETA 0:10 |')
    # Below an epoch a second: seconds an epoch.
    assert progress.line(60, {'loss': 0.5}).startswith('epoch 6/30, 100.0 s/epoch, ETA 40:00 |')
    # The zero-shot and few-shot jobs' lines stay in iterations.
    clock = iter([0.0, 2.0])
    iterations = reporting.Progress(0, 500)
    assert iterations.line(5, {}).startswith('[5/500] 2.50 it/s, ETA 3:18')
