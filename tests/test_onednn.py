"""oneDNN's convolutions on XLA:CPU (``config.convolution = 'onednn'``, zskt_jax/onednn.py):
the same values and gradients as XLA's convolution up to rounding, in every shape the models
use, and a clear fallback where they cannot run."""
import importlib.metadata
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import project_log

from zskt_jax import common, onednn
from zskt_jax.models import Generator, registry

NHWC = ('NHWC', 'HWIO', 'NHWC')
# Relative to the largest entry: float32 sums in another order; bfloat16 operands and results
# (8 bits of mantissa, 2^-8 = 3.9e-3 per rounding; both sides round).
TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture
def needs_onednn():
    ok, why = onednn.usable()
    if not ok:
        pytest.skip(f'oneDNN convolutions unavailable here: {why}')


def test_onednn_runs_where_the_requirements_are_installed():
    """requirements.txt installs oneDNN: with it and a compiler here, the library must build
    and load (a broken build would otherwise only show as every other test here skipped)."""
    if not (_installed('onednn-cpu-gomp') and _installed('onednn-devel-cpu-gomp')
            and shutil.which('g++')):
        pytest.skip('oneDNN (pip install -r requirements.txt) or g++ missing here')
    ok, line = onednn.usable()
    assert ok, line
    assert line.startswith('oneDNN 3.')


def _relative_errors(reference, other):
    return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                  / float(jnp.max(jnp.abs(a.astype(jnp.float32)))))
            for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(other))]


@pytest.mark.usefixtures('needs_onednn')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('batch,size,in_ch,out_ch,kernel,stride', [
    (3, 16, 3, 8, 3, 1),      # the stem: 3 input channels, an odd batch
    (4, 16, 8, 8, 3, 1),      # a block's 3x3, stride 1, padding 1
    (5, 16, 8, 16, 3, 2),     # a group's first 3x3: stride 2
    (5, 9, 5, 7, 3, 2),       # odd sizes and channel counts
    (3, 16, 8, 16, 1, 2),     # a 1x1 shortcut at stride 2 (oneDNN 3.2 would corrupt memory)
    (2, 8, 24, 48, 1, 1),     # a 1x1 at stride 1
    (1, 8, 16, 16, 3, 1),     # batch 1
])
def test_values_and_gradients_equal_xla_convolution(dtype, batch, size, in_ch, out_ch, kernel,
                                                    stride):
    padding = ((kernel // 2,) * 2,) * 2
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (batch, size, size, in_ch)).astype(dtype)
    w = (jax.random.normal(keys[1], (kernel, kernel, in_ch, out_ch))
         / (kernel * in_ch ** 0.5)).astype(dtype)

    def loss(conv):
        def f(x, w):  # a non-linear function of the output, so every gradient entry differs
            y = conv(x, w, (stride, stride), padding, dimension_numbers=NHWC)
            return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
        return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))

    reference = loss(jax.lax.conv_general_dilated)(x, w)
    ours = loss(onednn.conv_general_dilated)(x, w)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), ours) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), reference)
    (_, y_reference), grads_reference = reference
    (_, y), grads = ours
    # The outputs and both gradients (the scalar loss, a sum of terms of either sign, would
    # compare cancellation, not the convolution).
    errors = _relative_errors((y_reference, grads_reference), (y, grads))
    assert max(errors) < TOLERANCE[dtype], errors


@pytest.mark.usefixtures('needs_onednn')
def test_under_vmap_and_in_a_shard_map():
    """The seeds of config.num_seeds (a vmap) and the jobs' shard_map over the data axis (the
    kernel replicated, the images varying): the same values and kernel gradients."""
    from jax.sharding import PartitionSpec as P
    from zskt_jax import parallel
    x = jax.random.normal(jax.random.key(1), (2, 4, 8, 8, 4))
    w = jax.random.normal(jax.random.key(2), (3, 3, 4, 4)) / 6

    def loss(conv):
        return lambda w, x: jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                                 dimension_numbers=NHWC)))

    def run(conv):
        conv_loss = loss(conv)
        per_seed = jax.jit(jax.vmap(jax.value_and_grad(conv_loss)))(jnp.stack([w, 2 * w]), x)
        sharded = jax.jit(jax.shard_map(
            jax.value_and_grad(lambda w, x: jax.lax.pmean(conv_loss(w, x), 'data')),
            mesh=parallel.make_mesh(), in_specs=(P(), P('data')), out_specs=P()))(w, x[0])
        return per_seed, sharded

    errors = _relative_errors(run(jax.lax.conv_general_dilated), run(onednn.conv_general_dilated))
    assert max(errors) < 2e-5, errors


@pytest.mark.usefixtures('needs_onednn')
@pytest.mark.parametrize('arch', ['WRN-10-1', 'resnet18', 'vgg11'])
def test_networks_give_xla_gradients(arch):
    """A training step's gradients of each family (strided 3x3s, 1x1 shortcuts, biases) and of
    the generator (its upsampling convolution's four phases)."""
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    grads = []
    for convolution in ('xla', 'onednn'):
        model = registry.build(arch, 10, width=8, convolution=convolution)
        variables = model.init(jax.random.key(1), x)

        def loss(params):
            (logits, _), _ = model.apply({**variables, 'params': params}, x, train=True,
                                         mutable=['batch_stats'])
            return jnp.sum(jnp.square(logits))

        generator = Generator(init_size=4, hidden=8, convolution=convolution)
        z = jax.random.normal(jax.random.key(2), (3, 16))
        generator_variables = generator.init(jax.random.key(3), z)

        def generator_loss(params):
            images, _ = generator.apply({**generator_variables, 'params': params}, z,
                                        mutable=['batch_stats'])
            return jnp.sum(jnp.sin(images))

        grads.append((jax.jit(jax.grad(loss))(variables['params']),
                      jax.jit(jax.grad(generator_loss))(generator_variables['params'])))
    # Elementwise, with an atol relative to the network's largest gradient: conv biases that a
    # BatchNorm cancels (the generator's, VGG's) have exact gradient 0, rounding noise here.
    for reference, ours in zip(*grads):
        scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(reference))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale),
                     reference, ours)


def test_an_unknown_convolution_is_a_config_error():
    from ml_collections import ConfigDict
    with pytest.raises(common.ConfigError, match="config.convolution = 'mkl'"):
        common.convolution(ConfigDict({'convolution': 'mkl'}))


def test_falls_back_to_xla_saying_why(monkeypatch):
    """Where the library cannot be built or loaded (no compiler, no oneDNN, another backend),
    the run keeps XLA's convolutions and says why, once."""
    from ml_collections import ConfigDict
    monkeypatch.setattr(onednn, '_load', lambda: (None, 'no C++ compiler (set CXX, or install g++)'))
    common._log_once.cache_clear()
    with project_log(logging.WARNING) as records:
        assert common.convolution(ConfigDict({'convolution': 'onednn'})) == 'xla'
        assert common.convolution(ConfigDict({'convolution': 'onednn'})) == 'xla'
    messages = [r.getMessage() for r in records]
    assert messages == ["config.convolution = onednn: no C++ compiler (set CXX, or install g++); "
                        "using XLA's convolutions"]
    from zskt_jax.models.layers import conv_function
    assert conv_function(0, 'onednn') is None and conv_function(8, 'onednn') is not None


def test_a_build_without_onednn_says_what_to_install(monkeypatch):
    monkeypatch.setattr(onednn, '_prefixes', lambda: ('/nonexistent',))
    with pytest.raises(onednn.Unavailable, match='pip install -r requirements.txt'):
        onednn.build()


@pytest.mark.usefixtures('needs_onednn')
def test_a_run_with_onednn_resumes_bitwise(tmp_path, digits_data_dir, tiny_teacher):
    """The speed mode stops and resumes like the rest: 4 iterations straight equal 2, a stop,
    then 2 more from the checkpoint, bit for bit (oneDNN's sums are deterministic on a fixed
    thread count)."""
    import orbax.checkpoint as ocp
    from zskt_jax import zero_shot
    from tiny_config import tiny_zero_shot_config

    def run(workdir, stop_after=0):
        config = tiny_zero_shot_config(digits_data_dir, tiny_teacher, convolution='onednn',
                                       weight_grad_chunk=8, num_iterations=4,
                                       stop_after_iterations=stop_after)
        return zero_shot.train_and_evaluate(config, str(workdir))

    results = run(tmp_path / 'straight')
    # results.json says what ran: oneDNN's convolutions, whose kernel gradients are not sliced.
    assert (results['convolution'], results['weight_grad_chunk']) == ('onednn', 0)
    assert results['config']['weight_grad_chunk'] == 8
    run(tmp_path / 'resumed', stop_after=2)
    assert not (tmp_path / 'resumed' / 'results.json').exists()
    run(tmp_path / 'resumed')
    states = [ocp.StandardCheckpointer().restore(str(tmp_path / name / 'checkpoints' / '4' / 'state'))
              for name in ('straight', 'resumed')]
    leaves = [jax.tree.leaves(s) for s in states]
    assert len(leaves[0]) == len(leaves[1]) > 0
    for a, b in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
