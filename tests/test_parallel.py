"""Data parallelism: 8 devices compute what 1 device computes.

The comparisons need 8 devices, and the main pytest process keeps 1 (XLA fixes the device count
when the backend starts), so one subprocess with ``--xla_force_host_platform_device_count=8``
runs every computation on a 1-device mesh and on the 8-device mesh and saves the results; the
tests below compare them. The subprocess is this file run as a script (``worker``).
"""
import os
import re
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
BATCH = 16             # global batch: 2 rows per device on 8 devices
EVAL_EXAMPLES = 357    # not a multiple of 8 (nor of 2 hosts x 4 devices)
EVAL_BATCH = 100       # rounded up to 104 on 8 devices: a padded, masked last batch
ADAM_EPS = 1e-3        # for the 3-iteration comparison (see its test)
# Tolerances of the comparisons of whole states after several iterations (assert_states_close).
STATE_RTOL = 1e-3      # parameters, BatchNorm statistics, the replay memory: relative L2 per leaf
MOMENT_RTOL = 1e-2     # Adam's mu and nu (gradient statistics) and kept gradients
STATE_FLOOR = 1e-5     # per element, as a fraction of the largest entry of the leaf's group
METRICS_RTOL = 1e-3    # training metrics after several iterations (they carry the states' differences)


def subprocess_env(num_devices: int, cache: bool = True) -> dict:
    """Environment of a child JAX process on CPU with ``num_devices`` forced devices, sharing a
    persistent compilation cache (a repeated run of the tests then compiles almost nothing).

    The CPU backend compiles without LLVM optimisations (``--xla_backend_optimization_level=0``):
    it halves the compile time of these tiny programs, which dominates their running time, and
    both sides of every comparison are compiled alike.
    """
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
               XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices} '
                         '--xla_backend_optimization_level=0')
    if cache:
        env.setdefault('JAX_COMPILATION_CACHE_DIR',
                       os.path.join(tempfile.gettempdir(), 'zskt_jax_test_compilation_cache'))
        env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    return env


# ---------------------------------------------------------------------------------------------
# The subprocess.

def _flat(tree, prefix):
    import jax
    return {prefix + jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}


def _tiny_setup(**networks):
    """The tiny config, its networks and a teacher; ``networks``: 'teacher.arch'-style fields
    set before the networks are built (a toolbox pair)."""
    import jax
    import jax.numpy as jnp
    from zskt_jax import common
    from zskt_jax.zero_shot import Models
    from tiny_config import tiny_zero_shot_config
    config = tiny_zero_shot_config('', '', **networks)
    config.batch_size = BATCH
    models = Models(generator=common.build_generator(config),
                    student=common.build_network(config.student, 10, config),
                    teacher=common.build_network(config.teacher, 10, config))
    teacher_variables = jax.jit(models.teacher.init)(jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
    # Confident, non-uniform teacher beliefs (an untrained teacher is nearly uniform).
    head = next(name for name in ('fc', 'linear', 'classifier') if name in teacher_variables['params'])
    teacher_variables['params'][head]['kernel'] = teacher_variables['params'][head]['kernel'] * 20
    return config, models, jax.device_get(teacher_variables)


def _gradient_capture():
    """An optimizer that applies nothing and keeps the last gradient it was given: the
    gradients of a step, read from its optimizer state."""
    import jax
    import jax.numpy as jnp
    import optax
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def _keep_first_gradient():
    """Passes gradients through unchanged and keeps the first one it sees in its state."""
    import jax
    import jax.numpy as jnp
    import optax

    def update(grads, state, params=None):
        first = jax.tree.map(lambda kept, g: jnp.where(state['count'] == 0, g, kept),
                             state['first'], grads)
        return grads, {'count': state['count'] + 1, 'first': first}

    return optax.GradientTransformation(
        init=lambda params: {'count': jnp.zeros((), jnp.int32),
                             'first': jax.tree.map(jnp.zeros_like, params)},
        update=update)


# Every stabiliser of the later methods on (tests/test_stabilisers.py): the L1 criterion, the
# BatchNorm-statistics, balance and one-hot terms, a replay memory of 3 batches from which
# 8 images (1 per device) join every student batch, and the student's images shifted.
STABILISERS = dict(adversarial_loss='l1', bn_weight=0.5, balance_weight=2.0, one_hot_weight=0.5,
                   replay_size=3 * BATCH, replay_batch=8, student_augment='crop')
# A toolbox pair at tiny width (ResNet-18 stages 4/8/16/32 channels): its four stages in the
# attention term, its shortcut BatchNorms synchronised over the devices like the rest.
RESNET_PAIR = {'teacher.arch': 'resnet18', 'teacher.base_width': 8,
               'student.arch': 'resnet18', 'student.base_width': 8}


def _run_steps(mesh, out, networks=None, iterations=3, **overrides):
    """3 (``iterations``) iterations of the zero-shot step on ``mesh``; the optimizers also keep the first
    gradient each network received (the raw gradient, before clipping and Adam)."""
    import jax
    import optax
    from zskt_jax import parallel
    from zskt_jax.state import adam
    from zskt_jax.zero_shot import create_states, make_iteration_fn
    config, models, teacher_variables = _tiny_setup(**(networks or {}))
    # See test_three_iterations_on_8_devices_equal_1_device: with the paper's eps (1e-8) Adam
    # turns float32 rounding noise in near-zero gradients into whole-step differences.
    config.adam_eps = ADAM_EPS
    for name, value in overrides.items():
        config[name] = value
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    state, z_key = create_states(config, models, mesh)
    tx = optax.chain(_keep_first_gradient(),
                     adam(config.grad_clip, config.adam_b1, config.adam_b2, config.adam_eps))
    generator, student = (s.replace(tx=tx, opt_state=parallel.replicate(tx.init(s.params), mesh))
                          for s in (state.generator, state.student))
    state = state.replace(generator=generator, student=student)
    step = make_iteration_fn(models, config, mesh)
    for _ in range(iterations):
        state, metrics = step(state, teacher_variables, z_key)
        jax.block_until_ready(metrics)  # collectives in flight on 2 CPU cores can deadlock
    generator, student = state.generator, state.student
    out.update(_flat(state.state_dict(), 'step'))
    out.update(_flat(metrics, 'metrics'))
    out.update(_flat({'generator': generator.opt_state[0]['first'],
                      'student': student.opt_state[0]['first']}, 'grad'))


def _run_teacher_step(mesh, out):
    """The gradient of one teacher-training step (data-parallel SGD) on a fixed global batch."""
    import jax
    import jax.numpy as jnp
    from configs import teacher_digits
    from zskt_jax import common, parallel, teacher
    from zskt_jax.state import create_state
    config = teacher_digits.get_config()
    config.teacher.arch, config.teacher.base_width, config.augment = 'WRN-10-1', 4, 'none'
    model = common.build_network(config.teacher, 10, config)
    state = create_state(model, jax.random.key(0), jnp.zeros((2, 32, 32, 3)), _gradient_capture())
    state = parallel.replicate(state, mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, BATCH).astype(np.int32)
    rows = parallel.process_rows(BATCH, mesh)  # all of them: one process
    images, labels = parallel.global_batch((images[rows], labels[rows]), mesh, BATCH)
    step = teacher.make_train_step(model, config, steps_per_epoch=10, mesh=mesh)
    state, metrics = step(state, images, labels, jax.random.key(1))
    out.update(_flat(state.opt_state, 'teacher_grad'))
    out['teacher_loss'] = np.asarray(metrics['loss'])


def eval_split(num_examples: int = EVAL_EXAMPLES):
    """(model, variables, images, labels, correct): random images, half the labels agreeing
    with the model's predictions, so the accuracy is far from 0 and 1 and every miscounted
    example would show; ``correct`` counted with one plain forward pass."""
    import jax
    import jax.numpy as jnp
    from zskt_jax import data
    from zskt_jax.models import build_wide_resnet
    model = build_wide_resnet('WRN-10-1', 10, 4, axis_name='data')
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8)
    logits, _ = jax.jit(lambda v, x: model.apply(v, data.normalize(x, 'digits'), train=False))(
        variables, images)
    predictions = np.asarray(jnp.argmax(logits, -1))
    labels = np.where(rng.random(num_examples) < 0.5, predictions,
                      rng.integers(0, 10, num_examples)).astype(np.int32)
    return model, variables, images, labels, predictions


def _run_eval(mesh, out):
    from zskt_jax import common, parallel
    model, variables, images, labels, predictions = eval_split()
    evaluator = common.Evaluator(model, 'digits', images, labels, EVAL_BATCH, mesh)
    variables = parallel.replicate(variables, mesh)
    out['accuracy'] = np.float64(evaluator(variables))
    out['batches'] = np.int64(evaluator.num_batches)
    out['numpy_accuracy'] = np.float64(np.sum(predictions == labels) / EVAL_EXAMPLES)
    counts = evaluator.counts(variables)
    out['counts'] = np.stack([counts.correct, counts.examples, counts.predicted])
    out['numpy_counts'] = np.stack([np.bincount(labels[predictions == labels], minlength=10),
                                    np.bincount(labels, minlength=10),
                                    np.bincount(predictions, minlength=10)])


def worker(out_path: str):
    import jax
    from zskt_jax import parallel
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    out = {}
    for name, mesh in (('one', parallel.make_mesh(jax.devices()[:1])),
                       ('all', parallel.make_mesh())):
        results = {}
        _run_steps(mesh, results)
        stabilised = {}
        _run_steps(mesh, stabilised, **STABILISERS)
        results.update({f'stabilised/{k}': v for k, v in stabilised.items()})
        resnet = {}
        _run_steps(mesh, resnet, networks=RESNET_PAIR, iterations=1)  # see its test
        results.update({f'resnet/{k}': v for k, v in resnet.items()})
        onednn = {}  # the speed mode: a oneDNN custom call per device inside the shard_map
        _run_steps(mesh, onednn, iterations=1, convolution='onednn')
        results.update({f'onednn/{k}': v for k, v in onednn.items()})
        _run_teacher_step(mesh, results)
        _run_eval(mesh, results)
        out.update({f'{name}/{k}': v for k, v in results.items()})
    np.savez(out_path, **out)


# ---------------------------------------------------------------------------------------------
# The tests.

@pytest.fixture(scope='module')
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('parallel') / 'results.npz')
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), out], cwd=ROOT,
                          env=subprocess_env(NUM_DEVICES), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with np.load(out) as saved:
        one, everything = {}, {}
        for key in saved.files:
            mesh, name = key.split('/', 1)
            (one if mesh == 'one' else everything)[name] = saved[key]
    return one, everything


def _state_group(name: str):
    """(network, part, moment) of a state leaf's name: ('student', 'opt_state', 'mu') for
    ``step['student']['opt_state'][1][1].mu['conv1']['kernel']`` or its checkpoint spelling
    ``['student']['opt_state'][1]['mu']['conv1']['kernel']``; ('replay', None, None)."""
    keys = re.findall(r"\['(\w+)'\]", name)
    moment = re.search(r"(?:\.|\[')(mu|nu|first)\b", name)
    return keys[0], keys[1] if len(keys) > 1 else None, moment.group(1) if moment else None


def assert_states_close(pairs, state_rtol=STATE_RTOL, moment_rtol=MOMENT_RTOL):
    """``pairs``: (name, reference, other) for every leaf of two run states after several
    iterations. Integer leaves (step and update counters) are equal; each float leaf is within
    ``rtol * ||reference|| + STATE_FLOOR * scale * sqrt(size)`` in L2, where rtol is MOMENT_RTOL
    for Adam's moments and kept gradients, STATE_RTOL otherwise, and scale is the largest entry
    of the leaf's group (network, part, moment): leaves whose exact value is 0 (the gradients of
    the generator's conv biases, which BatchNorms cancel) hold rounding noise alone.

    Why norms and not elementwise 1e-5. The zero-shot iteration amplifies float32 rounding, by
    an amount that depends on the trajectory and so on the CPU. Measured on these tiny networks
    (8 devices against 1, 3 iterations, eps 1e-3, AMD EPYC): with the tests' teacher (seed 42)
    every leaf agrees to 4e-6 relative, while a 2-core Xeon with AVX-512 put one entry of an Adam
    mu 1.3e-5 apart (3.6e-4 of its leaf) and a 2-process run one 4.5e-5; teacher seeds 0-7 give
    up to 5.8e-3 (parameters) and 2.4e-2 (Adam moments). Most of it comes from the attention
    term (per-sample normalised maps): with beta = 0 those seeds agree to 1e-5, though not all
    of them elementwise; a two-pass BatchNorm variance (instead of E[x^2] - E[x]^2) cut one
    seed's difference 10x. Both are the paper's method and stay as they are.
    What a data-parallel bug does is larger: a gradient summed instead of averaged, statistics of
    one device's rows, z or replay rows drawn per device change whole leaves. In 3 iterations the
    student's kernels move 2.6e-2 to 5.5e-2 of their norm and the generator's 2e-3 to 1e-2, so a
    wrong update shows in them or, for the generator, in its Adam moments (a wrong gradient is
    O(1) there); a student learning rate 10% too large already fails here (measured). The first
    gradients, before any amplification, are compared elementwise (rtol 1e-4).
    """
    scales = {}
    for name, reference, _ in pairs:
        if reference.dtype.kind == 'f' and reference.size:
            group = _state_group(name)
            scales[group] = max(scales.get(group, 0.0), float(np.max(np.abs(reference))))
    for name, reference, other in pairs:
        assert other.shape == reference.shape, name
        if reference.dtype.kind != 'f':
            np.testing.assert_array_equal(other, reference, err_msg=name)
            continue
        if not reference.size:
            continue
        group = _state_group(name)
        rtol = moment_rtol if group[2] else state_rtol
        reference64, other64 = reference.astype(np.float64), other.astype(np.float64)
        difference = float(np.linalg.norm(other64 - reference64))
        bound = (rtol * float(np.linalg.norm(reference64))
                 + STATE_FLOOR * scales[group] * np.sqrt(reference.size))
        assert difference <= bound, (
            f'{name}: L2 difference {difference:.3g} > {bound:.3g} (norm '
            f'{np.linalg.norm(reference64):.3g}, rtol {rtol}, largest difference '
            f'{np.max(np.abs(other64 - reference64)):.3g})')


def _pairs(results, prefix):
    one, everything = results
    names = sorted(k for k in one if k.startswith(prefix))
    assert names and names == sorted(k for k in everything if k.startswith(prefix))
    return [(name, one[name], everything[name]) for name in names]


def test_three_iterations_on_8_devices_equal_1_device(results):
    """Same global batch and seed: the same states after 3 iterations (11 forward passes of the
    student each with cross-device BatchNorm, z drawn globally and sharded).

    Tolerance. 8 devices sum the same products in another order (per-device partial sums, then
    an all-reduce), so they agree to float32 rounding, not bitwise. Adam with the paper's eps
    (1e-8) amplifies that rounding without bound where a gradient is near zero: the generator's
    conv biases feed BatchNorms, which cancel them, so their exact gradient is 0 and the computed
    one (~1e-9) is rounding noise that Adam scales up to a large fraction of a +-lr step, in a
    direction that depends on the summation order. Measured (8 vs 1 device, this setup, paper
    eps): parameters differ by up to 2.4e-5 after 1 iteration and 3e-4 after 3 (many entries
    of the generator's Dense kernel, whose gradients are near eps in size, too). With eps = 1e-3
    the normalisation leaves gradients that small alone, so the test runs with eps = 1e-3 (the
    step's code is the same for any eps); the iterations still amplify rounding in ways that
    depend on the CPU, hence the per-leaf norms of assert_states_close. The metrics are means
    over the batch of the last iteration, compared elementwise at METRICS_RTOL (a mean over one
    device's 2 rows instead of all 16 would be off by the spread of the samples).
    test_gradients_on_8_devices_equal_1_device compares the gradients themselves, which Adam's
    eps does not touch.
    """
    assert_states_close(_pairs(results, 'step'))
    for name, one, eight in _pairs(results, 'metrics'):
        np.testing.assert_allclose(eight, one, rtol=METRICS_RTOL, atol=1e-7, err_msg=name)


def test_resnet_pair_on_8_devices_equal_1_device(results):
    """A toolbox pair (ResNet-18 -> ResNet-18 at width 8: attention over its four stages, the
    shortcut BatchNorms synchronised like the rest): the first gradients of both networks
    elementwise (rtol 1e-4), and after one iteration the metrics and the states.

    One iteration, and parameters within 1e-2 (relative L2 per leaf), because this pair
    amplifies float32 rounding far faster than the WRN pairs above (measured, 8 devices against
    1): the first gradients agree to 7e-6, but after one iteration the Adam steps of a few
    student BatchNorm biases differ by up to 1.1e-3 of their norm, and after three iterations
    half of the leaves differ by more than 1e-2 (the generator's Adam moments by 20%), with the
    attention term or without it. With the generator's learning rate at 0 the first gradients
    agree to 1e-5 and the iteration's metrics to 1e-5 as well, so the data parallelism is right;
    what diverges is the trajectory, as test_three_iterations_on_8_devices_equal_1_device
    describes for the WRNs."""
    for network in ("resnet/grad['generator']", "resnet/grad['student']"):
        pairs = _pairs(results, network)
        scale = max(float(np.max(np.abs(one))) for _, one, _ in pairs)
        for name, one, eight in pairs:
            np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    for name, one, eight in _pairs(results, 'resnet/metrics'):
        np.testing.assert_allclose(eight, one, rtol=METRICS_RTOL, atol=1e-7, err_msg=name)
    assert_states_close(_pairs(results, 'resnet/step'), state_rtol=1e-2)


def test_stabilised_iterations_on_8_devices_equal_1_device(results):
    """The same with every stabiliser on: the whole-batch BatchNorm moments and class balance
    (averaged over devices before the non-linear norms and logarithm), the one-hot and L1 terms,
    and the replay memory (each device writes the gathered global batch and draws its rows of
    the global replay indices): the same states, memory included, as one device. Tolerances
    as above."""
    pairs = _pairs(results, 'stabilised/step')
    assert any("['replay']" in name for name, _, _ in pairs)
    assert_states_close(pairs)
    metrics = _pairs(results, 'stabilised/metrics')
    assert {'bn_statistics', 'class_balance', 'one_hot', 'l1'} <= {
        name.split("'")[1] for name, _, _ in metrics}
    for name, one, eight in metrics:
        np.testing.assert_allclose(eight, one, rtol=METRICS_RTOL, atol=1e-7, err_msg=name)
    for network in ("stabilised/grad['generator']", "stabilised/grad['student']"):
        pairs = _pairs(results, network)
        scale = max(float(np.max(np.abs(one))) for _, one, _ in pairs)
        for name, one, eight in pairs:
            np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def _assert_gradients_close(pairs):
    scale = max(float(np.max(np.abs(one))) for _, one, _ in pairs)
    for name, one, other in pairs:
        np.testing.assert_allclose(other, one, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def test_onednn_convolutions_on_8_devices_equal_1_device(results):
    """config.convolution = 'onednn' (each device calls oneDNN inside the shard_map; the kernel
    gradients are summed over devices by JAX): the first gradients elementwise and the states
    after one iteration, as for XLA's convolutions above; and on one device the first gradients
    equal those of XLA's convolutions (the same tolerances: only the order of the sums differs)."""
    from zskt_jax import onednn  # here, not at import: the multi-host workers import this file
    if not onednn.usable()[0]:
        pytest.skip(f'oneDNN convolutions unavailable here: {onednn.usable()[1]}')
    for network in ("onednn/grad['generator']", "onednn/grad['student']"):
        _assert_gradients_close(_pairs(results, network))
    assert_states_close(_pairs(results, 'onednn/step'))
    one, _ = results
    for network in ("grad['generator']", "grad['student']"):
        names = sorted(k for k in one if k.startswith(network))
        _assert_gradients_close([(name, one[name], one[f'onednn/{name}']) for name in names])


def test_gradients_on_8_devices_equal_1_device(results):
    """The gradient each update applies is the global-batch mean on any number of devices: the
    shard_map pitfall (gradients summed over devices, 8x too large) would fail here. Adam hides
    a gradient's scale, so the raw gradients are read directly: those of the first generator
    and the first student update of the zero-shot step (kept by the optimizer), and that of one
    teacher SGD step (an optimizer that keeps it instead of applying it)."""
    for network in ("grad['generator']", "grad['student']", 'teacher_grad'):
        pairs = _pairs(results, network)
        norm_one = np.sqrt(sum(np.sum(np.square(one, dtype=np.float64)) for _, one, _ in pairs))
        norm_eight = np.sqrt(sum(np.sum(np.square(e, dtype=np.float64)) for _, _, e in pairs))
        assert norm_one > 0
        assert norm_eight / norm_one == pytest.approx(1.0, abs=1e-5), network
        # Float32 rounding of differently ordered sums. The atol, relative to the network's
        # largest gradient, covers entries that are 0 in exact arithmetic (biases that a
        # BatchNorm cancels: their computed gradients are ~1e-9 noise of either sign).
        scale = max(float(np.max(np.abs(one))) for _, one, _ in pairs)
        for name, one, eight in pairs:
            np.testing.assert_allclose(eight, one, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    one, everything = results
    np.testing.assert_allclose(everything['teacher_loss'], one['teacher_loss'], rtol=1e-6)


def test_accuracy_over_an_uneven_split_is_exact(results):
    one, everything = results
    # 357 examples in batches of 100 on 1 device (4 batches, the last of 57) and of 104 on 8
    # devices (13 rows each; the last batch has 45 real rows and 59 masked ones).
    assert one['batches'] == everything['batches'] == 4
    assert one['accuracy'] == everything['accuracy'] == one['numpy_accuracy']
    assert 0.3 < one['accuracy'] < 0.8
    # Per-class counts (correct, examples, predicted), as exact: padding rows never count.
    np.testing.assert_array_equal(one['counts'], one['numpy_counts'])
    np.testing.assert_array_equal(everything['counts'], one['numpy_counts'])
    assert one['counts'][1].sum() == one['counts'][2].sum() == 357


def test_class_counts_give_recall_and_the_classes_never_predicted():
    from zskt_jax.parallel import ClassCounts
    counts = ClassCounts(correct=np.array([3, 0, 0, 2]), examples=np.array([4, 2, 0, 2]),
                         predicted=np.array([5, 0, 1, 2]))
    assert counts.accuracy == 5 / 8
    assert counts.recall() == [0.75, 0.0, None, 1.0]
    assert counts.never_predicted() == [1]  # class 2 has no examples: not a symptom


def test_batch_that_does_not_divide_is_a_config_error_naming_both_numbers():
    from zskt_jax import parallel
    mesh = types.SimpleNamespace(devices=np.empty(NUM_DEVICES, object))
    with pytest.raises(ValueError, match=r'config.eval_batch_size = 100 .* 8 devices'):
        parallel.check_divisible(100, mesh, 'eval_batch_size')
    parallel.check_divisible(104, mesh, 'eval_batch_size')


def test_eval_batch_is_rounded_up_per_process_and_device():
    from zskt_jax import parallel

    def mesh(processes, devices_per_process):
        devices = [types.SimpleNamespace(process_index=p) for p in range(processes)
                   for _ in range(devices_per_process)]
        return types.SimpleNamespace(devices=np.array(devices, object))

    assert parallel.eval_batch_sizes(100, mesh(1, 1)) == (100, 100)
    assert parallel.eval_batch_sizes(100, mesh(1, 8)) == (104, 104)
    assert parallel.eval_batch_sizes(100, mesh(2, 4)) == (52, 104)
    assert parallel.eval_batch_sizes(500, mesh(4, 4)) == (128, 512)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    worker(sys.argv[1])
