"""Tests of zskt_jax.belief: image selection, targets, the batched attack against a per-image
loop, the MTE, loading students from run checkpoints, and the job end to end through run.py.

Networks are tiny (WRN-10-1, base width 4); the data is the offline digits builder in a pytest
temporary directory.
"""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax import belief, checkpoints, common, data, parallel
from zskt_jax.models import build_wide_resnet
from zskt_jax.state import TrainState, adam

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(arch='WRN-10-1', base_width=4)


def numpy_variables(model, input_shape, seed: int):
    """Variables of ``model`` with the shapes of ``model.init``, drawn with NumPy: He-normal
    (fan-out) conv kernels, uniform dense kernels, small biases, BN scale near 1 and running
    statistics near (0, 1). Tests use this instead of ``model.init``: on CPU every distinct shape
    of a JAX random draw is a compilation, and a WRN's init costs tens of seconds of them."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        shape = leaf.shape
        if 'kernel' in name and len(shape) == 4:
            value = rng.normal(0, np.sqrt(2.0 / (shape[0] * shape[1] * shape[3])), shape)
        elif 'kernel' in name:
            bound = 1 / np.sqrt(shape[0])
            value = rng.uniform(-bound, bound, shape)
        elif 'scale' in name:
            value = rng.uniform(0.8, 1.2, shape)
        elif 'bias' in name or 'mean' in name:
            value = rng.normal(0, 0.05, shape)
        elif 'var' in name:
            value = rng.uniform(0.8, 1.2, shape)
        else:
            raise ValueError(f'unexpected variable {jax.tree_util.keystr(path)}')
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def tiny_network(seed: int, logit_scale: float = 1.0):
    """A tiny random WRN whose logits are spread out (``logit_scale`` on the last layer) so that
    the attack moves the probabilities visibly."""
    model = build_wide_resnet(TINY['arch'], 10, TINY['base_width'])
    variables = numpy_variables(model, (1, 32, 32, 3), seed)
    params = dict(variables['params'])
    params['fc'] = {'kernel': params['fc']['kernel'] * logit_scale,
                    'bias': params['fc']['bias'] + jnp.linspace(-1, 1, 10)}
    return model, {'params': params, 'batch_stats': variables['batch_stats']}


STEPS, CHUNK = 4, 10  # the attack of the tests: 4 steps, 10 pairs per call (27 pairs: padding)


@pytest.fixture(scope='module')
def networks():
    return belief_case()[:2]


@pytest.fixture(scope='module')
def attack(networks):
    """One compiled attack for every test: A and B have the same architecture, so passing A's
    variables twice compares A with itself. 'steps': the CPU default."""
    (model_a, _), (model_b, _) = networks
    return belief.make_attack_fn(model_a, model_b, 'digits', STEPS, 1.0, parallel.make_mesh(),
                                 loop='steps')


def random_images():
    return np.random.default_rng(7).integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)


def belief_case():
    """The attack of the multi-device tests: networks A and B, 3 images, their 9 targets each
    (27 pairs)."""
    return (tiny_network(1, 20.0), tiny_network(2, 20.0), random_images(),
            belief.target_classes(np.array([1, 4, 7]), 10))


@pytest.fixture(scope='module')
def images():
    return random_images()


# ----------------------------------------------------------------------------------------------
# Image selection and targets

def test_agreeing_indices_keep_only_agreeing_images_in_seeded_order():
    rng = np.random.default_rng(0)
    predictions_a = rng.integers(0, 3, 200)
    predictions_b = rng.integers(0, 3, 200)
    picked = belief.agreeing_indices(predictions_a, predictions_b, seed=5, num_images=20)
    # The same thing written as the authors' loop: walk the shuffled order, keep matches.
    expected = [i for i in np.random.default_rng(5).permutation(200)
                if predictions_a[i] == predictions_b[i]][:20]
    np.testing.assert_array_equal(picked, expected)
    assert np.all(predictions_a[picked] == predictions_b[picked])
    assert len(set(picked.tolist())) == 20
    # Deterministic per seed, different across seeds.
    np.testing.assert_array_equal(
        picked, belief.agreeing_indices(predictions_a, predictions_b, seed=5, num_images=20))
    assert not np.array_equal(
        picked, belief.agreeing_indices(predictions_a, predictions_b, seed=6, num_images=20))
    # -1: every agreeing image; too few agreeing images: an error that says what to do.
    everything = belief.agreeing_indices(predictions_a, predictions_b, seed=5, num_images=-1)
    assert len(everything) == int(np.sum(predictions_a == predictions_b))
    np.testing.assert_array_equal(everything[:20], picked)
    with pytest.raises(ValueError, match='num_images'):
        belief.agreeing_indices(predictions_a, predictions_b, seed=5, num_images=199)


def test_targets_are_the_other_nine_classes():
    labels = np.array([0, 3, 9])
    targets = belief.target_classes(labels, 10)
    assert targets.shape == (3, 9)
    for label, row in zip(labels, targets):
        assert sorted(row.tolist()) == [c for c in range(10) if c != label]
        # The authors' order: (y + 1 + k) mod C.
        assert row.tolist() == [(label + 1 + k) % 10 for k in range(9)]


# ----------------------------------------------------------------------------------------------
# The attack

def reference_curves(model_a, variables_a, model_b, variables_b, image_uint8, target, steps, xi):
    """One (image, target) pair, one image at a time, as the authors' loop does it."""
    x = data.normalize(image_uint8[None], 'digits')  # a batch of one image
    p_a, p_b = [], []
    for _ in range(steps):
        probs_a, probs_b, grad = _reference_step(model_a, model_b, variables_a, variables_b, x,
                                                 target)
        p_a.append(float(probs_a[0, target]))
        p_b.append(float(probs_b[0, target]))
        x = x - xi * grad
    return np.array(p_a), np.array(p_b)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _reference_step(model_a, model_b, variables_a, variables_b, x, target):
    """Softmax of A and B on one image, and grad_x of A's cross-entropy towards ``target``."""
    def ce(x):
        logits, _ = model_a.apply(variables_a, x, train=False)
        return -jax.nn.log_softmax(logits)[0, target]

    probs_a = jax.nn.softmax(model_a.apply(variables_a, x, train=False)[0])
    probs_b = jax.nn.softmax(model_b.apply(variables_b, x, train=False)[0])
    return probs_a, probs_b, jax.grad(ce)(x)


@pytest.mark.parametrize('loop', ['steps', 'scan'])
def test_batched_attack_equals_per_image_loop(networks, attack, images, loop):
    (model_a, variables_a), (model_b, variables_b) = networks
    if loop == 'scan':  # the fixture is the CPU default, 'steps'
        attack = belief.make_attack_fn(model_a, model_b, 'digits', STEPS, 1.0,
                                       parallel.make_mesh(), loop='scan')
    labels = np.array([1, 4, 7])
    targets = belief.target_classes(labels, 10)  # 27 pairs
    mesh = parallel.make_mesh()
    # Chunks of 10 pairs: 3 chunks, the last one padded with 3 dummy pairs that are dropped.
    p_a, p_b = belief.transition_curves(attack, variables_a, variables_b, images, targets, CHUNK,
                                        mesh)
    assert p_a.shape == p_b.shape == (3, 9, STEPS)
    for i in range(3):
        for t in range(9):
            ref_a, ref_b = reference_curves(model_a, variables_a, model_b, variables_b,
                                            images[i], targets[i, t], STEPS, 1.0)
            np.testing.assert_allclose(p_a[i, t], ref_a, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(p_b[i, t], ref_b, rtol=1e-4, atol=1e-6)
    # The attack moves A towards the target: p_A(j) grows on average.
    assert p_a[..., -1].mean() > p_a[..., 0].mean() + 0.01

    # Step 0 is the unperturbed image.
    x = data.normalize(images, 'digits')
    probs_a = jax.nn.softmax(jax.jit(model_a.apply)(variables_a, x)[0])
    probs_b = jax.nn.softmax(jax.jit(model_b.apply)(variables_b, x)[0])
    np.testing.assert_allclose(p_a[..., 0], np.take_along_axis(np.asarray(probs_a), targets, 1),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p_b[..., 0], np.take_along_axis(np.asarray(probs_b), targets, 1),
                               rtol=1e-5, atol=1e-7)


def test_mte_is_zero_against_itself_and_positive_against_another(networks, attack, images):
    (_, variables_a), (_, variables_b) = networks
    targets = belief.target_classes(np.array([2, 5, 8]), 10)
    mesh = parallel.make_mesh()
    p_a, p_b = belief.transition_curves(attack, variables_a, variables_a, images, targets, CHUNK,
                                        mesh)
    assert belief.mean_transition_error(p_a, p_b, 100) == 0.0
    p_a, p_b = belief.transition_curves(attack, variables_a, variables_b, images, targets, CHUNK,
                                        mesh)
    mte = belief.mean_transition_error(p_a, p_b, 100)
    assert mte > 0.01
    assert mte == pytest.approx(np.mean(np.abs(p_a - p_b)))
    # Only the first mte_steps steps count.
    assert belief.mean_transition_error(p_a, p_b, 1) == pytest.approx(
        np.mean(np.abs(p_a[..., 0] - p_b[..., 0])))


def test_attack_is_the_same_on_four_devices(networks, attack, images, tmp_path):
    """The pairs split over a 4-device mesh (padding included) give the 1-device curves."""
    (_, variables_a), (_, variables_b) = networks
    targets = belief.target_classes(np.array([1, 4, 7]), 10)
    one_device = belief.transition_curves(attack, variables_a, variables_b, images, targets,
                                          CHUNK, parallel.make_mesh())
    out = str(tmp_path / 'four.npz')
    script = textwrap.dedent(f'''
        import sys; sys.path[:0] = [{ROOT!r}, {os.path.dirname(os.path.abspath(__file__))!r}]
        import jax, numpy as np
        from zskt_jax import belief, parallel
        from test_belief import belief_case, STEPS, CHUNK
        (ma, va), (mb, vb), images, targets = belief_case()
        mesh = parallel.make_mesh()
        fn = belief.make_attack_fn(ma, mb, 'digits', STEPS, 1.0, mesh, loop='steps')
        p_a, p_b = belief.transition_curves(fn, va, vb, images, targets, CHUNK, mesh)
        np.savez({out!r}, p_a=p_a, p_b=p_b, devices=jax.device_count())
    ''')
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    four = np.load(out)
    assert int(four['devices']) == 4
    np.testing.assert_allclose(four['p_a'], one_device[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(four['p_b'], one_device[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# Students from run checkpoints, and the job end to end

@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('digits_data')
    data.load_split('digits', 'test', data_dir=str(data_dir))
    return str(data_dir)


def write_tiny_teacher(path: str, seed: int = 3):
    model, variables = tiny_network(seed, 5.0)
    checkpoints.save_teacher(path, variables, {
        'arch': TINY['arch'], 'base_width': TINY['base_width'], 'num_classes': 10,
        'image_shape': [32, 32, 3], 'dataset': 'digits', 'source': 'test'})
    return variables


def write_zero_shot_run(workdir: str, teacher_path: str, digits_dir: str):
    """A checkpoint in the zero-shot job's format: generator and student states (Adam), and the
    record zero_shot.train_and_evaluate writes."""
    from zskt_jax import launch
    config = launch.load_config_file(os.path.join(ROOT, 'configs', 'digits.py'))
    config.dataset = 'digits'  # 32x32, as the tiny teacher
    config.data_dir = digits_dir
    config.teacher.arch, config.teacher.base_width = TINY['arch'], TINY['base_width']
    config.teacher.checkpoint = teacher_path
    config.student.arch, config.student.base_width = TINY['arch'], TINY['base_width']
    config.generator.hidden = 8
    # The states zero_shot.create_states makes (variables drawn with NumPy, see above).
    tx = adam(config.grad_clip, config.adam_b1, config.adam_b2, config.adam_eps)

    def state(model, input_shape, seed):
        variables = numpy_variables(model, input_shape, seed)
        return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                          batch_stats=variables['batch_stats'],
                          opt_state=tx.init(variables['params']), tx=tx)

    generator = state(common.build_generator(config), (2, config.generator.z_dim), 0)
    student = state(common.build_network(config.student, 10, config), (2, 32, 32, 3), 1)
    # A recognisable student, close to the teacher so that the two agree on many images.
    teacher_variables, teacher_meta = checkpoints.load_teacher(teacher_path)
    rng = np.random.default_rng(11)
    student = student.replace(
        params=jax.tree.map(
            lambda w: (w + 0.05 * np.std(w) * rng.standard_normal(w.shape)).astype(w.dtype),
            teacher_variables['params']),
        batch_stats=teacher_variables['batch_stats'])
    run_checkpoints = checkpoints.RunCheckpoints(os.path.join(workdir, 'checkpoints'), 2)
    run_checkpoints.save(7, {'generator': generator.state_dict(), 'student': student.state_dict()},
                         {'config': config.to_dict(), 'iteration': 7, 'history': [],
                          'teacher_path': os.path.abspath(teacher_path),
                          'teacher_checksum': teacher_meta['checksum']})
    run_checkpoints.wait()
    run_checkpoints.close()
    return student


@pytest.fixture(scope='module')
def zero_shot_run(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp('runs')
    teacher_path = str(root / 'teacher')
    write_tiny_teacher(teacher_path)
    workdir = str(root / 'zero_shot')
    student = write_zero_shot_run(workdir, teacher_path, digits_dir)
    return workdir, teacher_path, student


def test_load_student_from_a_zero_shot_checkpoint(zero_shot_run):
    workdir, teacher_path, student = zero_shot_run
    model, variables, run_config, meta = belief.load_student(workdir)
    assert meta['step'] == 7 and run_config.job == 'zero_shot'
    assert meta['teacher_path'] == os.path.abspath(teacher_path)
    assert model.depth == 10 and model.base_width == 4
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(variables['params']),
                 jax.device_get(student.params))
    with pytest.raises(belief.StudentNotFoundError, match='checkpoints'):
        belief.load_student(os.path.dirname(workdir))


def test_belief_job_end_to_end(zero_shot_run, tmp_path):
    from zskt_jax import launch
    workdir, teacher_path, _ = zero_shot_run
    config = launch.load_config_file(os.path.join(ROOT, 'configs', 'belief_digits.py'))
    config.student_workdir = workdir
    config.num_images = -1  # random tiny networks agree on few images
    config.num_steps = 3
    config.batch_size = 64
    out = str(tmp_path / 'belief')
    results = launch.run_job(config, out)
    with open(os.path.join(out, 'results.json')) as f:
        written = json.load(f)
    assert written['job'] == 'belief' and written['mte'] == pytest.approx(results['mte'])
    assert written['mte_steps'] == 3
    assert 0 < written['mte'] < 1
    assert os.path.getsize(os.path.join(out, 'transition_curves.png')) > 1000
    curves = np.load(os.path.join(out, 'curves.npz'))
    n = written['num_images']
    assert n > 0
    assert curves['p_a'].shape == curves['p_b'].shape == (n, 9, 3)
    assert curves['image_indices'].shape == (n,) and curves['targets'].shape == (n, 9)
    assert written['mte'] == pytest.approx(np.mean(np.abs(curves['p_a'] - curves['p_b'])))
    # The attacked images are ones both networks classify alike, with their true labels.
    images, labels = data.load_split('digits', 'test', data_dir=run_config_data_dir(workdir))
    np.testing.assert_array_equal(curves['labels'], labels[curves['image_indices']])
    _, variables_a, run_config, _ = belief.load_student(workdir)
    model = common.build_network(run_config.student, 10, run_config)
    teacher_variables, _ = checkpoints.load_teacher(teacher_path)
    x = data.normalize(images[curves['image_indices']], 'digits')
    apply = jax.jit(model.apply)
    logits_a = apply(variables_a, x)[0]
    logits_b = apply(teacher_variables, x)[0]
    np.testing.assert_array_equal(np.argmax(logits_a, -1), np.argmax(logits_b, -1))
    np.testing.assert_allclose(
        curves['p_a'][..., 0],
        np.take_along_axis(np.asarray(jax.nn.softmax(logits_a)), curves['targets'], 1),
        rtol=1e-5, atol=1e-7)


def run_config_data_dir(workdir):
    _, _, run_config, _ = belief.load_student(workdir)
    return run_config.data_dir
