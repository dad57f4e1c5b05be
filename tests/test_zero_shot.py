"""The zero-shot iteration: direction of the updates, purity, the teacher untouched, the schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax import losses, parallel
from zskt_jax.models import Generator, build_wide_resnet
from zskt_jax.parallel import DATA_AXIS
from zskt_jax.state import init_variables, cosine_learning_rate
from zskt_jax.zero_shot import Models, ZeroShotState, create_states, draw_z, make_iteration_fn

from conftest import tiny_zero_shot_config


@pytest.fixture(scope='module')
def setup():
    config = tiny_zero_shot_config('', '')
    config.num_iterations = 10
    config.n_s = 3
    models = Models(generator=Generator(hidden=8, axis_name=DATA_AXIS),
                    student=build_wide_resnet('WRN-10-1', 10, 4, axis_name=DATA_AXIS),
                    teacher=build_wide_resnet('WRN-10-1', 10, 8, axis_name=DATA_AXIS))
    mesh = parallel.make_mesh()
    teacher_variables = init_variables(models.teacher, jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
    # A teacher with confident, non-uniform beliefs (an untrained one is nearly uniform).
    teacher_variables['params']['fc']['kernel'] = teacher_variables['params']['fc']['kernel'] * 20
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    state, z_key = create_states(config, models, mesh)
    return config, models, mesh, teacher_variables, state.generator, state.student, z_key


def kl_on(models, generator, student, teacher_variables, z):
    """KL(T || S) on G(z), both G and S with batch statistics, nothing updated."""
    @jax.jit
    def kl(generator, student):
        images, _ = models.generator.apply(
            {'params': generator.params, 'batch_stats': generator.batch_stats}, z, train=True,
            mutable=['batch_stats'])
        t, _ = models.teacher.apply(teacher_variables, images, train=False)
        (s, _), _ = models.student.apply(
            {'params': student.params, 'batch_stats': student.batch_stats}, images, train=True,
            mutable=['batch_stats'])
        return losses.kl_divergence(t, s)
    # The student's BN averages over the 'data' axis: run it inside the 1-device mesh.
    return float(jax.jit(parallel.data_parallel(
        kl, models_mesh[0], (jax.sharding.PartitionSpec(),) * 2, jax.sharding.PartitionSpec()))(
            generator, student))


models_mesh = []


def test_generator_update_increases_kl_and_student_updates_decrease_it(setup):
    config, models, mesh, teacher_variables, generator, student, z_key = setup
    models_mesh[:] = [mesh]
    z = draw_z(z_key, 0, config.batch_size, config.generator.z_dim)
    kl_start = kl_on(models, generator, student, teacher_variables, z)

    config_g = config.copy_and_resolve_references()
    config_g.n_s = 1
    # Generator step alone: n_s = 1 with a zero student learning rate leaves S's weights as they are.
    with config_g.unlocked():
        config_g.student_lr = 0.0
    state = ZeroShotState(generator, student)
    after_generator, _ = make_iteration_fn(models, config_g, mesh)(state, teacher_variables, z_key)
    g1, s1 = after_generator.generator, after_generator.student
    kl_after_generator = kl_on(models, g1, student.replace(batch_stats=s1.batch_stats),
                               teacher_variables, z)
    assert kl_after_generator > kl_start

    after, metrics = make_iteration_fn(models, config, mesh)(state, teacher_variables, z_key)
    g2, s2 = after.generator, after.student
    kl_after_student = kl_on(models, g2, s2, teacher_variables, z)
    kl_before_student = kl_on(models, g2, student.replace(batch_stats=s2.batch_stats),
                              teacher_variables, z)
    assert kl_after_student < kl_before_student
    assert metrics['kl'] < metrics['kl_before_student_updates']


def test_step_is_pure_and_leaves_the_teacher_unchanged(setup):
    config, models, mesh, teacher_variables, generator, student, z_key = setup
    teacher_copy = jax.tree.map(np.array, jax.device_get(teacher_variables))
    step = make_iteration_fn(models, config, mesh)
    state = ZeroShotState(generator, student)
    out1 = step(state, teacher_variables, z_key)
    out2 = step(state, teacher_variables, z_key)
    for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(teacher_copy), jax.tree.leaves(teacher_variables)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # A different key gives a different z, hence different parameters.
    out3 = step(state, teacher_variables, jax.random.key(123))
    assert not np.array_equal(np.asarray(jax.tree.leaves(out3[0].student.params)[0]),
                              np.asarray(jax.tree.leaves(out1[0].student.params)[0]))


def test_cosine_schedule_is_stepped_once_per_iteration(setup):
    config, models, mesh, teacher_variables, generator, student, z_key = setup
    step = make_iteration_fn(models, config, mesh)
    state = ZeroShotState(generator, student)
    for k in range(3):
        state, metrics = step(state, teacher_variables, z_key)
        generator, student = state.generator, state.student
        lrs = np.asarray(metrics['student_lr_per_update'])
        assert lrs.shape == (config.n_s,)
        # Every update of iteration k uses lr_k = lr_0 * 0.5 * (1 + cos(pi k / N)).
        expected = config.student_lr * 0.5 * (1 + np.cos(np.pi * k / config.num_iterations))
        np.testing.assert_allclose(lrs, expected, rtol=1e-6)
        np.testing.assert_allclose(metrics['generator_lr'], config.generator_lr * 0.5 * (
            1 + np.cos(np.pi * k / config.num_iterations)), rtol=1e-6)
        assert int(student.step) == int(generator.step) == k + 1
    assert float(cosine_learning_rate(1.0, 10, 10)) == pytest.approx(0.0, abs=1e-7)


def test_scan_and_unrolled_updates_agree(setup):
    config, models, mesh, teacher_variables, _, _, _ = setup
    outputs = []
    for mode in ('scan', 'unroll'):
        c = config.copy_and_resolve_references()
        c.update_loop = mode
        c.adam_eps = 1e-3  # see test_seeds_and_precision: keeps zero-gradient elements still
        state, z_key = create_states(c, models, mesh)
        outputs.append(make_iteration_fn(models, c, mesh)(state, teacher_variables, z_key))
    for a, b in zip(jax.tree.leaves(outputs[0][0]), jax.tree.leaves(outputs[1][0])):
        # Another summation order only: far below one Adam step (lr 2e-3) that a wrong update
        # order would change.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
