"""Parameter counts and structure of the WideResNets and the generator (docs/method.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zskt_jax.state import init_variables

from zskt_jax.models import Generator, build_wide_resnet, parse_arch
from zskt_jax.models.generator import upsample_conv3x3


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('arch,expected', [('WRN-16-1', 175_066), ('WRN-16-2', 691_674),
                                           ('WRN-40-1', 563_930), ('WRN-40-2', 2_243_546)])
def test_wide_resnet_parameter_counts(arch, expected):
    variables = jax.eval_shape(build_wide_resnet(arch, 10).init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    assert count(variables['params']) == expected


def test_generator_parameter_count():
    variables = jax.eval_shape(Generator().init, jax.random.key(0), jnp.zeros((1, 100)))
    assert count(variables['params']) == 1_051_145


def test_wide_resnet_outputs_and_group_shapes():
    model = build_wide_resnet('WRN-16-2', 10)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    logits, groups = jax.eval_shape(model.apply, variables, jnp.ones((2, 32, 32, 3)))
    assert logits.shape == (2, 10)
    assert [g.shape for g in groups] == [(2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 128)]


def test_wide_resnet_init_statistics():
    """Convs N(0, sqrt(2 / (k*k*out))) (He, fan-out); BN scale 1, bias 0; FC bias 0."""
    variables = init_variables(build_wide_resnet('WRN-16-1', 10), jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    kernel = np.asarray(variables['params']['block3_layer_1']['conv2']['kernel'])  # 3x3x64x64
    assert kernel.shape == (3, 3, 64, 64)
    assert abs(kernel.std() - np.sqrt(2 / (9 * 64))) < 0.02 * np.sqrt(2 / (9 * 64))
    assert abs(kernel.mean()) < 0.01 * np.sqrt(2 / (9 * 64))
    assert np.all(np.asarray(variables['params']['bn1']['scale']) == 1)
    assert np.all(np.asarray(variables['params']['fc']['bias']) == 0)


def test_generator_output_is_batch_normalised():
    generator = Generator()
    variables = init_variables(generator, jax.random.key(0), jnp.zeros((1, 100)))
    z = jax.random.normal(jax.random.key(1), (64, 100))
    images, _ = jax.jit(lambda v, z: generator.apply(v, z, train=True, mutable=['batch_stats']))(
        variables, z)
    assert images.shape == (64, 32, 32, 3)
    np.testing.assert_allclose(np.asarray(images).mean((0, 1, 2)), 0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(images).std((0, 1, 2)), 1, atol=1e-3)


def test_batchnorm_running_variance_is_unbiased():
    """PyTorch updates running_var with the unbiased batch variance (docs/method.md)."""
    from zskt_jax.models.layers import BatchNorm
    x = jax.random.normal(jax.random.key(0), (4, 2, 2, 3)) * 3 + 1
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.key(0), x)
    _, updated = bn.apply(variables, x, mutable=['batch_stats'])
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(updated['batch_stats']['var'], 0.9 + 0.1 * flat.var(0, ddof=1),
                               rtol=1e-5)
    np.testing.assert_allclose(updated['batch_stats']['mean'], 0.1 * flat.mean(0), rtol=1e-5)


@pytest.mark.parametrize('bad', ['WRN-15-1', 'ResNet-18', 'WRN-16'])
def test_bad_architecture_names_are_explained(bad):
    with pytest.raises(ValueError, match='WRN'):
        parse_arch(bad)


def test_upsample_conv_equals_conv_of_the_upsampled_input():
    """The generator's x2 nearest upsampling + 3x3 conv, computed as four 2x2 convs of the
    low-resolution input: the same outputs and the same input and kernel gradients as the
    authors' form, conv(Upsample(x)), including at the zero-padded borders."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)), jnp.float32)      # non-square, odd height
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 7)), jnp.float32)
    target = jnp.asarray(rng.normal(size=(3, 10, 8, 7)), jnp.float32)

    def reference(x, kernel):
        upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(upsampled, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    for fn in (reference, upsample_conv3x3):
        assert fn(x, kernel).shape == (3, 10, 8, 7)
    loss = lambda fn: lambda x, k: jnp.sum(fn(x, k) * target)
    np.testing.assert_allclose(upsample_conv3x3(x, kernel), reference(x, kernel), atol=1e-4)
    for got, want in zip(jax.grad(loss(upsample_conv3x3), (0, 1))(x, kernel),
                         jax.grad(loss(reference), (0, 1))(x, kernel)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_chunked_weight_grad_conv_gives_the_plain_gradients(dtype):
    """layers.chunked_weight_grad_conv (the CPU default) only reorders the kernel gradient's sum:
    the outputs, input and kernel gradients of a WRN (3x3 and strided 1x1 convs) and of the
    generator equal those of the plain convolution."""
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(16, 32, 32, 3)), jnp.float32)
    z = jnp.asarray(rng.normal(size=(16, 100)), jnp.float32)
    cases = [(lambda chunk: build_wide_resnet('WRN-10-1', 10, 4, dtype=dtype,
                                              weight_grad_chunk=chunk), images),
             (lambda chunk: Generator(hidden=8, dtype=dtype, weight_grad_chunk=chunk), z)]
    for build, x in cases:
        variables = init_variables(build(0), jax.random.key(1), x[:2])

        def loss(params, x, chunk):
            out, _ = build(chunk).apply({'params': params, 'batch_stats': variables['batch_stats']},
                                        x, train=True, mutable=['batch_stats'])
            out = out[0] if isinstance(out, tuple) else out
            return jnp.sum(jnp.square(out.astype(jnp.float32) - 0.3))

        grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
        (plain_loss, plain), (chunked_loss, chunked) = (grad(variables['params'], x, c)
                                                        for c in (0, 4))
        tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(chunked_loss, plain_loss, rtol=tolerance)
        plain_leaves, chunked_leaves = jax.tree.leaves(plain), jax.tree.leaves(chunked)
        assert len(plain_leaves) == len(chunked_leaves) > 10
        for a, b in zip(plain_leaves, chunked_leaves):
            assert a.dtype == b.dtype == jnp.float32
            scale = float(jnp.max(jnp.abs(a))) + 1e-12
            np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale,
                                       atol=tolerance)


def test_weight_grad_chunk_is_a_cpu_lever(monkeypatch):
    """config.weight_grad_chunk slices kernel gradients on CPU only: on a GPU or TPU (where the
    slices cost time) the networks get 0, the whole batch, and the run says so once."""
    from ml_collections import ConfigDict

    from conftest import project_log
    from zskt_jax import common
    sliced, plain = ConfigDict({'weight_grad_chunk': 64}), ConfigDict({'weight_grad_chunk': 0})
    monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
    assert common.weight_grad_chunk(sliced) == 64 and common.weight_grad_chunk(plain) == 0
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    common._log_once.cache_clear()
    with project_log() as records:
        assert [common.weight_grad_chunk(c) for c in (sliced, sliced, plain)] == [0, 0, 0]
    assert [r.getMessage() for r in records] == [
        'config.weight_grad_chunk = 64 is a CPU lever; on gpu each kernel gradient takes the '
        'whole batch at once (faster there)']
