"""The later data-free methods' stabilisers as options of the one compiled zero-shot iteration:
off, the paper's iteration is unchanged and none of their work is traced; on, each term is the
one docs/method.md describes, the teacher stays frozen, and the replay memory is state (its
bitwise resume: tests/test_checkpoints.py, which runs configs/digits.py; 8 vs 1 device:
tests/test_parallel.py)."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from zskt_jax import losses, parallel, zero_shot
from zskt_jax.models.layers import BatchNorm
from zskt_jax.zero_shot import Stabilisers, create_states, make_iteration_fn

import golden_iteration

# Every stabiliser on at once (the L1 criterion in place of the KL).
ALL_ON = dict(adversarial_loss='l1', bn_weight=0.5, balance_weight=2.0, one_hot_weight=0.5,
              replay_size=48, replay_batch=8, student_augment='crop')


def test_paper_iteration_equals_the_golden_values_recorded_before_the_stabilisers():
    """Two iterations of the paper's loop (configs/default.py, every stabiliser off) against the
    values the code before the stabilisers produced (tests/golden_iteration.py). 1e-5 relative
    absorbs the rounding of another CPU; entries that pass through zero get 1e-7 absolute."""
    got = golden_iteration.run_iterations(golden_iteration.paper_config())
    with np.load(golden_iteration.GOLDEN) as golden:
        assert sorted(got) == sorted(golden.files)
        for name in golden.files:
            np.testing.assert_allclose(got[name], golden[name], rtol=1e-5, atol=1e-7,
                                       err_msg=name)


class Traced(Exception):
    pass


def _lower(config):
    config, models = _tiny(config)
    mesh = parallel.make_mesh()
    teacher = _teacher(models)
    state, z_key = create_states(config, models, mesh)
    return make_iteration_fn(models, config, mesh).lower(state, teacher, z_key)


def _tiny(config, axis_name=parallel.DATA_AXIS):
    """The networks of tests/golden_iteration.py; ``axis_name=None`` for the same networks
    applied outside the mesh (their BatchNorms then average over this batch only)."""
    from zskt_jax.models import Generator, build_wide_resnet
    return config, zero_shot.Models(
        generator=Generator(init_size=8, hidden=8, axis_name=axis_name),
        student=build_wide_resnet('WRN-10-1', 10, 4, axis_name=axis_name),
        teacher=build_wide_resnet('WRN-10-1', 10, 4, axis_name=axis_name))


def _teacher(models, seed=42):
    """A confident teacher whose running statistics are not the initial 0 / 1 (so that a term
    that read the wrong statistics would show)."""
    from zskt_jax.state import init_variables
    variables = init_variables(models.teacher, jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    variables = jax.device_get(variables)
    variables['params']['fc']['kernel'] = variables['params']['fc']['kernel'] * 20
    rng = np.random.default_rng(seed)
    variables['batch_stats'] = jax.tree_util.tree_map_with_path(
        lambda path, x: (rng.uniform(0.5, 2.0, x.shape) if path[-1].key == 'var'
                         else rng.normal(0, 0.3, x.shape)).astype(np.float32),
        variables['batch_stats'])
    return variables


def test_stabilisers_that_are_off_are_not_traced(monkeypatch):
    """With every stabiliser off, the compiled iteration computes none of their terms: each
    term's function fails if called, and the paper's iteration traces without calling any. Each
    stabiliser turned on alone does call its function (so the check can fail)."""
    def fail(name):
        def raiser(*args, **kwargs):
            raise Traced(name)
        return raiser

    monkeypatch.setattr(losses, 'bn_statistics_loss', fail('bn_weight'))
    monkeypatch.setattr(losses, 'class_balance_loss', fail('balance_weight'))
    monkeypatch.setattr(losses, 'one_hot_loss', fail('one_hot_weight'))
    monkeypatch.setitem(losses.ADVERSARIAL_LOSSES, 'l1', fail('adversarial_loss'))
    monkeypatch.setattr(zero_shot, '_bn_layers', fail('bn_weight'))
    monkeypatch.setattr(zero_shot, 'draw_replay_indices', fail('replay_size'))
    monkeypatch.setattr(zero_shot, 'draw_shifts', fail('student_augment'))

    paper = golden_iteration.paper_config()
    hlo = _lower(paper).as_text()
    assert 'all_gather' not in hlo and 'all-gather' not in hlo  # no replay memory writes
    assert Stabilisers.from_config(paper) == Stabilisers()
    for field, value in (('adversarial_loss', 'l1'), ('bn_weight', 1.0), ('balance_weight', 1.0),
                         ('one_hot_weight', 1.0), ('replay_size', 32),
                         ('student_augment', 'crop')):
        overrides = {field: value, **({'replay_batch': 8} if field == 'replay_size' else {})}
        with pytest.raises(Traced, match=field):
            _lower(golden_iteration.paper_config(**overrides))


def _bn_inputs(model, variables, images):
    """{layer path: input} of every BatchNorm in an inference-mode forward pass, captured by
    interception (independent of the moments the layers sow for the iteration)."""
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, BatchNorm) and context.method_name == '__call__':
            captured[tuple(context.module.path)] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply(variables, images, train=False)
    return captured


def test_bn_term_matches_the_teachers_running_statistics_and_leaves_the_teacher_alone():
    config, models = _tiny(golden_iteration.paper_config(bn_weight=1.0))
    mesh = parallel.make_mesh()
    teacher = _teacher(models)
    teacher_before = jax.tree.map(np.array, teacher)
    state, z_key = create_states(config, models, mesh)
    _, plain = _tiny(config, axis_name=None)
    z = zero_shot.draw_z(z_key, 0, config.batch_size, config.generator.z_dim)
    images, _ = plain.generator.apply(
        {'params': state.generator.params, 'batch_stats': state.generator.batch_stats}, z,
        train=True, mutable=['batch_stats'])

    # NumPy: the biased moments (over N, H, W) of each BatchNorm's input against that layer's
    # running statistics, L2 norms of the differences, summed over the 7 BatchNorms of WRN-10-1.
    inputs = _bn_inputs(plain.teacher, teacher, images)
    assert len(inputs) == 7
    expected = 0.0
    for layer, x in inputs.items():
        running = teacher['batch_stats']
        for part in layer:
            running = running[part]
        expected += (np.linalg.norm(np.float64(running['var']) - x.var(axis=(0, 1, 2)))
                     + np.linalg.norm(np.float64(running['mean']) - x.mean(axis=(0, 1, 2))))

    # The inference-mode output is unchanged by asking for the moments (running statistics
    # normalise), and the teacher's statistics are not written.
    inference = plain.teacher.apply(teacher, images, train=False)
    sown, mutated = plain.teacher.apply(teacher, images, train=False,
                                        mutable=[zero_shot.INPUT_MOMENTS])
    np.testing.assert_array_equal(np.asarray(inference[0]), np.asarray(sown[0]))
    assert set(mutated) == {zero_shot.INPUT_MOMENTS}

    new_state, metrics = make_iteration_fn(models, config, mesh)(state, teacher, z_key)
    # n_g = 1: the reported term is the one the generator's single update differentiated.
    np.testing.assert_allclose(float(metrics['bn_statistics']), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics['generator_loss']), float(
        metrics['generator_adversarial']) + float(metrics['bn_statistics']), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher)):
        np.testing.assert_array_equal(a, np.asarray(b))  # the teacher is never updated
    # The term moves the generator: its update differs from the paper's.
    paper_config, _ = _tiny(golden_iteration.paper_config())
    paper_state, _ = make_iteration_fn(models, paper_config, mesh)(state, teacher, z_key)
    assert not np.allclose(np.asarray(new_state.generator.params['fc']['kernel']),
                           np.asarray(paper_state.generator.params['fc']['kernel']))


# A replay memory of 2 batches (of the tiny config's 16), 8 images of it replayed into every
# student batch.
RING_BATCH = 16
RING = dict(replay_size=2 * RING_BATCH, replay_batch=8)


def test_replay_memory_holds_the_generated_batches_in_a_ring():
    batch = RING_BATCH
    config, models = _tiny(golden_iteration.paper_config(**RING))
    mesh = parallel.make_mesh()
    teacher = _teacher(models)
    state, z_key = create_states(config, models, mesh)
    _, plain = _tiny(config, axis_name=None)
    assert state.replay.shape == (2 * batch, 32, 32, 3) and not np.any(np.asarray(state.replay))
    step = make_iteration_fn(models, config, mesh)
    written = []
    for k in range(3):
        state, metrics = step(state, teacher, z_key)
        # The images the student saw at iteration k: the updated generator on z_k (training-mode
        # BatchNorm, so its running statistics do not matter).
        z = zero_shot.draw_z(z_key, k, batch, config.generator.z_dim)
        images, _ = plain.generator.apply(
            {'params': state.generator.params, 'batch_stats': state.generator.batch_stats}, z,
            train=True, mutable=['batch_stats'])
        written.append(np.asarray(images))
        indices = np.asarray(zero_shot.draw_replay_indices(z_key, k, batch, 2 * batch, 8))
        assert indices.min() >= 0 and indices.max() < min((k + 1) * batch, 2 * batch)
    memory = np.asarray(state.replay)
    # Iteration 2 overwrote rows 0..15 (iteration 0's); rows 16..31 hold iteration 1's.
    np.testing.assert_allclose(memory[:batch], written[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(memory[batch:], written[1], rtol=1e-5, atol=1e-5)
    assert np.isfinite(float(metrics['student_loss']))


@pytest.mark.parametrize('overrides, message', [
    (dict(replay_size=40), 'replay_size = 40 and config.replay_batch = 0: set both'),
    (dict(replay_size=40, replay_batch=8), 'replay_size = 40 must be a multiple of config.batch_size = 16'),
    (dict(bn_weight=-1.0), 'bn_weight = -1.0; it must be >= 0'),
    (dict(adversarial_loss='js'), "adversarial_loss = 'js'; choose one of"),
    (dict(student_augment='flip'), "student_augment = 'flip'; choose 'none' or 'crop'"),
])
def test_stabiliser_settings_that_cannot_work_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
        Stabilisers.from_config(golden_iteration.paper_config(**overrides))


def test_two_seeds_with_every_stabiliser_equal_two_single_seed_runs():
    """The vmapped program carries a replay memory per seed."""
    def run(**overrides):
        config, models = _tiny(golden_iteration.paper_config(**ALL_ON, **overrides))
        mesh = parallel.make_mesh()
        teacher = parallel.replicate(_teacher(models), mesh)
        state, z_key = create_states(config, models, mesh)
        step = make_iteration_fn(models, config, mesh)
        for _ in range(2):
            state, metrics = step(state, teacher, z_key)
        return state, metrics

    both, metrics = run(num_seeds=2)
    assert both.replay.shape == (2, 48, 32, 32, 3) and metrics['one_hot'].shape == (2,)
    single, single_metrics = run(seed=1)
    for a, b in zip(jax.tree.leaves(both.state_dict()), jax.tree.leaves(single.state_dict())):
        # vmap batches the convolutions: float summation order only (see
        # test_seeds_and_precision for the tolerance).
        np.testing.assert_allclose(np.asarray(a)[1], np.asarray(b), rtol=1e-4, atol=5e-5)
    np.testing.assert_allclose(metrics['student_loss'][1], single_metrics['student_loss'],
                               rtol=1e-4)


def test_shifted_images_move_by_their_shift_and_repeat_the_border():
    """iteration.shift_images against NumPy: output pixel (y, x) is input pixel
    (clip(y + dy), clip(x + dx)), for every shift H/8 allows (2 at 16x16)."""
    from zskt_jax.iteration import max_shift, shift_images
    rng = np.random.default_rng(0)
    images = rng.normal(size=(25, 16, 16, 3)).astype(np.float32)
    assert max_shift(16) == 2 and max_shift(32) == 4
    shifts = np.array([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)], np.int32)
    got = np.asarray(shift_images(jnp.asarray(images), jnp.asarray(shifts)))
    rows = np.arange(16)
    for image, (dy, dx), out in zip(images, shifts, got):
        ys, xs = np.clip(rows + dy, 0, 15), np.clip(rows + dx, 0, 15)
        np.testing.assert_array_equal(out, image[ys][:, xs])
    np.testing.assert_array_equal(got[12], images[12])  # (0, 0): unchanged


def test_shifts_cover_the_range_from_the_key_and_iteration_alone():
    key = jax.random.key(3)
    shifts = np.asarray(zero_shot.draw_shifts(key, 5, 4096, 32))
    assert shifts.shape == (4096, 2) and set(np.unique(shifts)) == set(range(-4, 5))
    np.testing.assert_array_equal(shifts, np.asarray(zero_shot.draw_shifts(key, 5, 4096, 32)))
    assert not np.array_equal(shifts, np.asarray(zero_shot.draw_shifts(key, 6, 4096, 32)))


def test_crop_changes_the_student_update_and_not_the_generator_update():
    """The shifts act on the student's batch only: after one iteration (replay on) the generator
    and the memory are the run's without them (the memory keeps the images as generated,
    test_replay_memory_holds_the_generated_batches_in_a_ring), the student is not."""
    def one_iteration(augment):
        config, models = _tiny(golden_iteration.paper_config(**RING, student_augment=augment))
        mesh = parallel.make_mesh()
        state, z_key = create_states(config, models, mesh)
        state, _ = make_iteration_fn(models, config, mesh)(state, _teacher(models), z_key)
        return state

    plain, shifted = one_iteration('none'), one_iteration('crop')
    assert np.any(np.asarray(plain.replay))
    for a, b in zip(jax.tree.leaves((plain.generator.params, plain.replay)),
                    jax.tree.leaves((shifted.generator.params, shifted.replay))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(plain.student.params['fc']['kernel']),
                           np.asarray(shifted.student.params['fc']['kernel']))
