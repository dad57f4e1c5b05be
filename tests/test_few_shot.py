"""Tests of zskt_jax.few_shot: the M-per-class draw, the batch stream, the schedule, the KD+AT
loss against NumPy, and the job end to end through run.py (plain, resumed, and fine-tuning a
zero-shot student, whose checkpoint the belief job then reads).

Networks are tiny (WRN-10-1, base width 4); the data is the offline digits builder in a pytest
temporary directory.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax import belief, few_shot, losses
from zskt_jax.teacher import step_learning_rate

from test_belief import ROOT, TINY, write_tiny_teacher, write_zero_shot_run


# ----------------------------------------------------------------------------------------------
# M images per class

def test_sample_per_class_takes_the_first_m_of_each_class_after_a_seeded_shuffle():
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    picked = few_shot.sample_per_class(labels, 7, seed=3, num_classes=10)
    assert len(picked) == 70 and len(set(picked.tolist())) == 70
    np.testing.assert_array_equal(np.bincount(labels[picked], minlength=10), [7] * 10)
    # Written out as a loop: walk the shuffled training set, keep an image while its class has
    # fewer than M.
    kept, counts = [], np.zeros(10, int)
    for i in np.random.default_rng(3).permutation(1000):
        if counts[labels[i]] < 7:
            kept.append(i)
            counts[labels[i]] += 1
    np.testing.assert_array_equal(picked, kept)
    # Deterministic per seed; another seed draws other images.
    np.testing.assert_array_equal(picked, few_shot.sample_per_class(labels, 7, 3, 10))
    assert set(few_shot.sample_per_class(labels, 7, 4, 10).tolist()) != set(picked.tolist())
    # M = -1: everything; too large an M: an error naming the smallest class.
    np.testing.assert_array_equal(few_shot.sample_per_class(labels, -1, 3, 10), np.arange(1000))
    smallest = int(np.bincount(labels).min())
    assert len(few_shot.sample_per_class(labels, smallest, 3, 10)) == 10 * smallest
    with pytest.raises(ValueError, match='images_per_class'):
        few_shot.sample_per_class(labels, smallest + 1, 3, 10)


def test_batch_stream_is_epochs_of_permutations_and_a_function_of_the_iteration():
    stream = few_shot.BatchStream(n=30, batch_size=8, seed=1)
    batches = np.concatenate([stream(i) for i in range(15)])  # 120 positions = 4 epochs
    for epoch in range(4):
        assert sorted(batches[30 * epoch:30 * (epoch + 1)].tolist()) == list(range(30))
    assert not np.array_equal(batches[:30], batches[30:60])  # a new order each epoch
    # Batch i does not depend on which batches were drawn before it (resumption).
    fresh = few_shot.BatchStream(n=30, batch_size=8, seed=1)
    np.testing.assert_array_equal(fresh(11), batches[88:96])
    # A subset smaller than the batch still gives full batches.
    small = few_shot.BatchStream(n=5, batch_size=8, seed=0)(0)
    assert len(small) == 8 and set(small.tolist()) == set(range(5))


def test_iterations_equal_the_full_data_run_for_every_m():
    from zskt_jax import launch
    config = launch.load_config_file(os.path.join(ROOT, 'configs', 'few_shot_svhn.py'))
    assert config.job == 'few_shot'
    assert (config.alpha, config.temperature, config.beta) == (0.9, 4.0, 1000.0)
    assert few_shot.num_iterations(config, 73257) == 100 * (73257 // 128) == 57200
    cifar = launch.load_config_file(os.path.join(ROOT, 'configs', 'few_shot_cifar10.py'))
    assert few_shot.num_iterations(cifar, 50000) == 200 * 390
    assert cifar.augment == 'crop_flip' and config.augment == 'none'
    # The teacher's milestones at 30/60/80% of the run: lr 0.1, 0.02, 0.004, 0.0008.
    lrs = [float(step_learning_rate(0.1, jnp.asarray(i), 57200, (0.3, 0.6, 0.8), 0.2))
           for i in (0, 17159, 17160, 34320, 45760, 57199)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008], rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# The loss

def test_kd_at_loss_matches_numpy():
    rng = np.random.default_rng(0)
    b, c = 6, 10
    student_logits = rng.normal(0, 3, (b, c)).astype(np.float32)
    teacher_logits = rng.normal(0, 3, (b, c)).astype(np.float32)
    labels = rng.integers(0, c, b)
    shapes = [(b, 8, 8, 4), (b, 4, 4, 8), (b, 2, 2, 16)]
    student_acts = [rng.normal(size=s).astype(np.float32) for s in shapes]
    teacher_acts = [rng.normal(size=s[:3] + (s[3] * 2,)).astype(np.float32) for s in shapes]
    alpha, tau, beta = 0.9, 4.0, 1000.0

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ce = -np.mean(log_softmax(student_logits.astype(np.float64))[np.arange(b), labels])
    log_t = log_softmax(teacher_logits.astype(np.float64) / tau)
    log_s = log_softmax(student_logits.astype(np.float64) / tau)
    kl = np.sum(np.exp(log_t) * (log_t - log_s)) / (b * c)  # averaged over batch * classes

    def attention(a):
        m = np.mean(a.astype(np.float64) ** 2, axis=-1).reshape(len(a), -1)
        return m / np.maximum(np.linalg.norm(m, axis=-1, keepdims=True), 1e-12)

    at = sum(np.mean((attention(s) - attention(t)) ** 2) for s, t in zip(student_acts,
                                                                          teacher_acts))
    expected = (1 - alpha) * ce + 2 * alpha * tau ** 2 * kl + beta * at

    loss, ce_j, kl_j, at_j = losses.kd_at_loss(student_logits, teacher_logits, labels,
                                               student_acts, teacher_acts, alpha, tau, beta)
    np.testing.assert_allclose([ce_j, kl_j, at_j], [ce, kl, at], rtol=1e-5)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# The job end to end

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    """A digits data dir, a tiny teacher, and a tiny few-shot config that uses them."""
    from zskt_jax import launch
    root = tmp_path_factory.mktemp('few_shot')
    data_dir = str(root / 'data')
    teacher_path = str(root / 'teacher')
    write_tiny_teacher(teacher_path)
    config = launch.load_config_file(os.path.join(ROOT, 'configs', 'few_shot_digits.py'))
    config.dataset = 'digits'  # 32x32, as the tiny teacher
    config.data_dir = data_dir
    config.teacher.arch, config.teacher.base_width = TINY['arch'], TINY['base_width']
    config.teacher.checkpoint = teacher_path
    config.student.arch, config.student.base_width = TINY['arch'], TINY['base_width']
    config.images_per_class = 3
    config.full_data_epochs = 1
    config.batch_size = 16               # 1437 // 16 = 89 iterations a full-data epoch ...
    config.scale_iterations = 4 / 89     # ... scaled to 4
    config.eval_every_iterations = 2
    config.log_every_iterations = 2
    config.checkpoint_every_iterations = 2
    return root, config


def read_results(workdir):
    with open(os.path.join(workdir, 'results.json')) as f:
        return json.load(f)


def test_few_shot_job_end_to_end_and_resume(setup):
    from zskt_jax import launch
    root, config = setup
    workdir = str(root / 'few_shot')
    results = launch.run_job(config, workdir)
    written = read_results(workdir)
    assert written['job'] == 'few_shot' and written['iterations'] == 4
    assert written['train_images'] == 30 and written['images_per_class'] == 3
    assert 0 <= written['student_accuracy'] <= 1 and 0 <= written['teacher_accuracy'] <= 1
    assert written['student_accuracy'] == results['student_accuracy']
    assert [h['iteration'] for h in written['history']] == [2, 4]
    assert os.listdir(os.path.join(workdir, 'tensorboard'))
    # The checkpoint is one the belief job (and init_student_from) can read.
    model, variables, run_config, meta = belief.load_student(workdir)
    assert meta['step'] == 4 and run_config.job == 'few_shot'
    assert model.depth == 10 and model.base_width == 4
    # Stopped after 2 iterations, then resumed: the same student as the uninterrupted run (the
    # batch of iteration i is a function of (seed, i) alone).
    stopped = config.copy_and_resolve_references()
    stopped.stop_after_iterations = 2
    resumed_dir = str(root / 'few_shot_resumed')
    assert launch.run_job(stopped, resumed_dir)['stopped_at'] == 2
    resumed = launch.run_job(config, resumed_dir)
    assert resumed['student_accuracy'] == results['student_accuracy']
    assert [h['iteration'] for h in resumed['history']] == [2, 4]
    _, resumed_variables, _, _ = belief.load_student(resumed_dir)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed_variables),
                 jax.device_get(variables))


def test_fine_tuning_a_zero_shot_student(setup):
    """"ours + M": the few-shot job started from a zero-shot run's student."""
    from zskt_jax import launch
    root, config = setup
    zero_shot_dir = str(root / 'zero_shot')
    student = write_zero_shot_run(zero_shot_dir, config.teacher.checkpoint, config.data_dir)
    config = config.copy_and_resolve_references()
    config.init_student_from = zero_shot_dir
    workdir = str(root / 'ours_plus_m')
    results = launch.run_job(config, workdir)
    written = read_results(workdir)
    assert written['init_student']['workdir'] == os.path.abspath(zero_shot_dir)
    assert written['init_student']['job'] == 'zero_shot'
    # Iteration 0 is the zero-shot student itself, evaluated before any update.
    history = written['history']
    assert [h['iteration'] for h in history] == [0, 2, 4]
    from zskt_jax import common, data, parallel
    model = common.build_network(config.student, 10, config)
    images, labels = data.load_split('digits', 'test', data_dir=config.data_dir)
    evaluator = common.Evaluator(model, 'digits', images, labels, 360, parallel.make_mesh())
    assert history[0]['student_accuracy'] == pytest.approx(evaluator(
        {'params': student.params, 'batch_stats': student.batch_stats}))
    assert results['student_accuracy'] == history[-1]['student_accuracy']
    # Another student architecture is refused with a message naming the difference.
    wrong = config.copy_and_resolve_references()
    wrong.student.arch = 'WRN-16-1'
    with pytest.raises(Exception, match='student.arch'):
        few_shot._initial_student(wrong, None, parallel.make_mesh())
