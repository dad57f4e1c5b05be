"""The toolbox's pairs through the training jobs: networks by name from the registry, attention
transfer over the stages of equal size, a preset on, golden values, bitwise resume.

    python tests/test_toolbox_pairs.py      # rewrites tests/golden/resnet_dfq_iteration.npz

Only rerun that on purpose: the file is what the golden test compares against.
"""
import json
import os
import sys

import numpy as np
import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
GOLDEN = os.path.join(TESTS_DIR, 'golden', 'resnet_dfq_iteration.npz')

# ResNet-34 -> ResNet-18 at width 4 (stages of 4/8/16/32 channels at 32/16/8/4 pixels).
PAIR = {'teacher.arch': 'resnet34', 'teacher.base_width': 4,
        'student.arch': 'resnet18', 'student.base_width': 4}


def pair_config(data_dir='', teacher='', **overrides):
    """The tests' tiny zero-shot config (tests/tiny_config.py) with the ResNet pair and DFQ's
    preset resolved (BN statistics, one-hot and class balance on the generator)."""
    from tiny_config import tiny_zero_shot_config
    from zskt_jax import methods
    config = tiny_zero_shot_config(data_dir, teacher, **PAIR, method='dfq',
                                   weight_grad_chunk=0, adam_eps=1e-3, **overrides)
    methods.resolve(config)
    return config


def write_pair_teacher(path):
    """A randomly initialised ResNet-34 teacher (width 4), confident (head x 20), saved as the
    jobs load teachers."""
    import jax
    import jax.numpy as jnp
    from zskt_jax import checkpoints
    from zskt_jax.models import registry
    from zskt_jax.state import init_variables
    model = registry.build('resnet34', 10, width=4)
    variables = init_variables(model, jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
    variables['params']['linear']['kernel'] = variables['params']['linear']['kernel'] * 20
    checkpoints.save_teacher(path, variables, {
        'arch': 'resnet34', 'base_width': 4, 'num_classes': 10, 'image_shape': [32, 32, 3],
        'dataset': 'digits', 'source': 'test'})
    return path


def run_iteration(config, teacher_path):
    """{name: array} of the states and metrics after one iteration on one device."""
    import jax
    from zskt_jax import checkpoints, common, parallel
    from zskt_jax.zero_shot import Models, create_states, make_iteration_fn
    models = Models(generator=common.build_generator(config),
                    student=common.build_network(config.student, 10, config),
                    teacher=common.build_network(config.teacher, 10, config))
    mesh = parallel.make_mesh(jax.devices()[:1])
    teacher, _ = checkpoints.load_teacher(teacher_path)
    teacher = parallel.replicate(teacher, mesh)
    state, z_key = create_states(config, models, mesh)
    state, metrics = make_iteration_fn(models, config, mesh)(state, teacher, z_key)
    out = {f'metrics/{k}': np.asarray(v) for k, v in metrics.items()}
    for name in ('generator', 'student'):
        for path, leaf in jax.tree_util.tree_flatten_with_path(
                jax.device_get(getattr(state, name).state_dict()))[0]:
            out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def test_attention_pairs_of_the_toolbox_pairs():
    """Each student stage with the teacher stage of its size (the last one where two share it)."""
    from configs import cifar10
    from zskt_jax import common
    expected = {('resnet34', 'resnet18'): ((0, 0), (1, 1), (2, 2), (3, 3)),
                ('vgg11', 'resnet18'): ((0, 0), (1, 1), (2, 2), (4, 3)),  # VGG: 32/16/8/4/4
                ('wrn40_2', 'wrn16_1'): ((0, 0), (1, 1), (2, 2)),
                ('wrn40_2', 'wrn40_1'): ((0, 0), (1, 1), (2, 2)),
                ('wrn40_2', 'wrn16_2'): ((0, 0), (1, 1), (2, 2)),
                ('WRN-40-2', 'resnet18'): ((0, 0), (1, 1), (2, 2))}  # ResNet's 4x4 stage alone
    for (teacher, student), pairs in expected.items():
        config = cifar10.get_config()
        config.teacher.arch, config.student.arch = teacher, student
        config.teacher.base_width = config.student.base_width = 0
        assert common.attention_pairs(config) == pairs, (teacher, student)


def test_a_pair_without_stages_of_equal_size_needs_beta_0():
    from configs import digits
    from zskt_jax import common
    from zskt_jax.errors import ConfigError
    config = digits.get_config()  # 16x16: WRN groups at 16/8/4
    config.teacher.arch, config.student.arch = 'WRN-16-1', 'resnet18'
    config.student.base_width = 4
    assert common.attention_pairs(config) == ((0, 0), (1, 1), (2, 2))
    config.dataset = 'digits'  # 32x32 teacher and a registered net with no stage of its size
    from zskt_jax.models import registry
    registry.register('tiny_mlp_for_tests', lambda num_classes, **_: None)
    try:
        config.student.arch = 'tiny_mlp_for_tests'
        with pytest.raises(ConfigError, match='attention transfer needs teacher and student '
                                              'stages of equal spatial size'):
            common.attention_pairs(config)
        config.beta = 0.0
        assert common.attention_pairs(config) == ()
    finally:
        registry.unregister('tiny_mlp_for_tests')


def test_resnet_pair_with_a_preset_equals_its_golden_values(tmp_path):
    """One iteration of ResNet-34 -> ResNet-18 (width 4) with DFQ's preset: the values recorded
    when the registry was threaded through the job (``python tests/test_toolbox_pairs.py``).
    1e-5 relative, as the WRN golden test (tests/test_stabilisers.py)."""
    teacher = write_pair_teacher(str(tmp_path / 'teacher'))
    got = run_iteration(pair_config(), teacher)
    assert got['metrics/bn_statistics'] > 0 and got['metrics/attention'] > 0
    with np.load(GOLDEN) as golden:
        assert sorted(got) == sorted(golden.files)
        for name in golden.files:
            np.testing.assert_allclose(got[name], golden[name], rtol=1e-5, atol=1e-7,
                                       err_msg=name)


def test_resnet_pair_resumes_bitwise(tmp_path, digits_data_dir):
    """The zero-shot job on the ResNet pair with a preset on: 3 iterations straight, and 2 then
    a stop and a resumed run to 3, end in the same states bit for bit; results.json records the
    registry's architectures and the resolved preset."""
    import jax
    from zskt_jax import zero_shot
    from test_checkpoints import assert_trees_equal, final_states
    teacher = write_pair_teacher(str(tmp_path / 'teacher'))

    def run(workdir, **overrides):
        config = pair_config(digits_data_dir, teacher, num_iterations=3,
                             checkpoint_every_iterations=1, eval_every_iterations=3, **overrides)
        return zero_shot.train_and_evaluate(config, str(workdir))

    run(tmp_path / 'straight')
    stopped = run(tmp_path / 'resumed', stop_after_iterations=2)
    assert stopped['stopped_at'] == 2
    run(tmp_path / 'resumed')
    (step_a, a), (step_b, b) = final_states(tmp_path / 'straight'), final_states(tmp_path / 'resumed')
    assert step_a == step_b == 3
    assert_trees_equal(a, b)
    results = json.loads((tmp_path / 'resumed' / 'results.json').read_text())
    assert (results['config']['teacher']['arch'], results['config']['student']['arch']) == (
        'resnet34', 'resnet18')
    assert results['config']['method'] == 'dfq' and results['config']['bn_weight'] == 0.1
    jax.clear_caches()


if __name__ == '__main__':
    import tempfile
    sys.path[:0] = [TESTS_DIR, ROOT]
    import conftest  # noqa: F401  (the XLA flags the tests run with, set before JAX starts)
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with tempfile.TemporaryDirectory() as directory:
        values = run_iteration(pair_config(), write_pair_teacher(os.path.join(directory, 't')))
    np.savez(GOLDEN, **values)
    print(f'{len(values)} arrays written to {GOLDEN}')
