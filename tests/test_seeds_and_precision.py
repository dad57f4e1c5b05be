"""Several seeds in one program (vmap) and the bfloat16 compute path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax.state import init_variables

from zskt_jax import parallel
from zskt_jax.models import Generator, build_wide_resnet
from zskt_jax.parallel import DATA_AXIS
from zskt_jax.zero_shot import Models, create_states, make_iteration_fn

from conftest import project_log, tiny_zero_shot_config


def tiny(num_seeds=1, seed=0, dtype=jnp.float32, compute_dtype='float32'):
    config = tiny_zero_shot_config('', '')
    config.num_iterations = 10
    config.num_seeds = num_seeds
    config.seed = seed
    config.compute_dtype = compute_dtype
    # Adam normalises each gradient element: one whose true gradient is zero (a bias before a
    # BatchNorm) but whose float value is 1e-9 of either sign gets a full +-lr step, so two
    # correct programs that sum in another order can differ by whole steps there. A larger eps
    # keeps such elements still and lets the comparison below be tight.
    config.adam_eps = 1e-3
    models = Models(generator=Generator(hidden=8, axis_name=DATA_AXIS, dtype=dtype),
                    student=build_wide_resnet('WRN-10-1', 10, 4, axis_name=DATA_AXIS, dtype=dtype),
                    teacher=build_wide_resnet('WRN-10-1', 10, 4, axis_name=DATA_AXIS, dtype=dtype))
    return config, models


@pytest.fixture(scope='module')
def teacher_variables():
    _, models = tiny()
    variables = init_variables(models.teacher, jax.random.key(7), jnp.zeros((1, 32, 32, 3)))
    variables['params']['fc']['kernel'] = variables['params']['fc']['kernel'] * 20
    return variables


def run(config, models, teacher_variables, iterations=2):
    mesh = parallel.make_mesh()
    state, z_key = create_states(config, models, mesh)
    step = make_iteration_fn(models, config, mesh)
    for _ in range(iterations):
        state, metrics = step(state, teacher_variables, z_key)
    return state.generator, state.student, metrics


def test_two_seeds_in_one_program_equal_two_single_seed_runs(teacher_variables):
    config, models = tiny(num_seeds=2)
    generator, student, metrics = run(config, models, teacher_variables)
    assert metrics['kl'].shape == (2,)
    for i in range(2):
        config_i, _ = tiny(seed=i)
        generator_i, student_i, metrics_i = run(config_i, models, teacher_variables)
        for batched, single in ((generator, generator_i), (student, student_i)):
            for a, b in zip(jax.tree.leaves(batched.state_dict()),
                            jax.tree.leaves(single.state_dict())):
                # vmap batches the convolutions, which changes float summation order only: the
                # tolerance is 1/40 of one Adam step (lr 2e-3) that mixing up seeds or dropping
                # an update would show.
                np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-4, atol=5e-5)
        np.testing.assert_allclose(metrics['student_loss'][i], metrics_i['student_loss'],
                                   rtol=1e-4)
    # The pairs really are independent: different seeds, different students.
    assert not np.allclose(np.asarray(jax.tree.leaves(student.params)[0])[0],
                           np.asarray(jax.tree.leaves(student.params)[0])[1])


def test_bfloat16_runs_and_keeps_float32_parameters_and_optimizer_state(teacher_variables):
    config, models = tiny(dtype=jnp.bfloat16, compute_dtype='bfloat16')
    generator, student, metrics = run(config, models, teacher_variables, iterations=1)
    for state in (generator, student):
        for leaf in jax.tree.leaves((state.params, state.batch_stats, state.opt_state)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert leaf.dtype == jnp.float32
    assert all(np.isfinite(float(v)) for k, v in metrics.items() if np.ndim(v) == 0)
    assert metrics['kl'].dtype == jnp.float32

    # The activations really are bf16.
    x = jnp.zeros((2, 32, 32, 3))
    variables = {'params': student.params, 'batch_stats': student.batch_stats}
    _, groups = models.student.apply(variables, x)
    assert all(g.dtype == jnp.bfloat16 for g in groups)


def test_several_seeds_job_reports_each_seed_and_mean_std(tmp_path, digits_data_dir,
                                                          tiny_teacher):
    """The zero-shot job with num_seeds = 2: each seed evaluated, mean +- std in results.json,
    seed 1's accuracy that of a single-seed run with seed 1; on CPU a warning that separate runs
    are faster."""
    import json
    import logging
    from zskt_jax import zero_shot
    config = dict(num_iterations=2, adam_eps=1e-3)
    with project_log(logging.WARNING) as records:
        results = zero_shot.train_and_evaluate(
            tiny_zero_shot_config(digits_data_dir, tiny_teacher, num_seeds=2, **config),
            str(tmp_path / 'two'))
    per_seed = results['student_accuracy_per_seed']
    assert results['seeds'] == [0, 1] and len(per_seed) == 2
    assert results['student_accuracy'] == pytest.approx(np.mean(per_seed))
    assert results['student_accuracy_std'] == pytest.approx(np.std(per_seed))
    with open(tmp_path / 'two' / 'results.json') as f:
        written = json.load(f)
    assert written['student_accuracy_per_seed'] == per_seed
    assert written['history'][-1]['student_accuracy_per_seed'] == per_seed
    for recall, accuracy in zip(written['history'][-1]['per_class_accuracy_per_seed'], per_seed):
        # The accuracy is the per-class accuracies' average weighted by class size.
        assert len(recall) == 10 and min(recall) - 1e-9 <= accuracy <= max(recall) + 1e-9
    assert len(written['history'][-1]['classes_never_predicted_per_seed']) == 2
    warned = any('num_seeds = 2 on CPU' in r.getMessage() for r in records)
    assert warned == (jax.default_backend() == 'cpu')

    single = zero_shot.train_and_evaluate(
        tiny_zero_shot_config(digits_data_dir, tiny_teacher, seed=1, **config),
        str(tmp_path / 'one'))
    # Accuracies over 360 images: equal up to one image whose argmax float rounding may flip.
    assert abs(single['student_accuracy'] - per_seed[1]) <= 1 / 360 + 1e-9
    assert 'student_accuracy_per_seed' not in single
