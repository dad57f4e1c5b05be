"""Layers shared by the WideResNet and the generator, matching PyTorch's semantics."""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# The collection in which inference-mode BatchNorms sow the (mean, biased variance) of their
# input when it is mutable: ``apply(..., mutable=[INPUT_MOMENTS])``.
INPUT_MOMENTS = 'input_moments'

# config.convolution: XLA's own convolutions, or oneDNN's on XLA:CPU (``conv_function``).
CONVOLUTIONS = ('xla', 'onednn')


def torch_uniform(fan_in: int, scale: float = 1.0):
    """U(-b, b) with b = scale / sqrt(fan_in): PyTorch's default Linear/Conv init.

    kaiming_uniform(a=sqrt(5)) gives b = 1/sqrt(fan_in) for weights; the default bias init uses
    the same bound. Flax's initialisers only see the bias shape, so fan_in is closed over.
    """
    bound = scale / jnp.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class BatchNorm(nn.Module):
    """PyTorch-faithful BatchNorm over the last (channel) axis.

    Differences from ``flax.linen.BatchNorm`` (docs/method.md, section "BatchNorm modes"): the
    running variance is updated with the UNBIASED batch variance (n / (n - 1)), as torch does. With
    ``axis_name``
    the batch statistics are averaged over that mesh axis (cross-device BatchNorm), so that the
    function computed does not depend on the number of devices. Statistics are computed in
    float32 whatever the activation dtype.
    """

    use_running_average: Optional[bool] = None
    momentum: float = 0.9  # Flax convention: running = momentum * running + (1 - momentum) * batch
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: Optional[str] = None
    dtype: Optional[Dtype] = None

    @nn.compact
    def __call__(self, x, use_running_average: Optional[bool] = None):
        use_running_average = nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
        scale = self.param('scale', nn.initializers.ones, (features,)) if self.use_scale else None
        bias = self.param('bias', nn.initializers.zeros, (features,)) if self.use_bias else None

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            if self.is_mutable_collection(INPUT_MOMENTS) and not self.is_initializing():
                # The batch moments of this layer's INPUT, for BatchNorm-statistics matching
                # (DeepInversion; docs/method.md, section "Stabilisers"): computed only when the
                # caller asks for them, normalisation still uses the running statistics.
                self.sow(INPUT_MOMENTS, 'moments', self.batch_moments(x, features)[:2])
        else:
            mean, var, count = self.batch_moments(x, features)
            if not self.is_initializing():
                unbiased = var * (count / max(count - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased

        dtype = self.dtype or x.dtype
        inv = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            inv = inv * scale
        shift = -mean * inv
        if bias is not None:
            shift = shift + bias
        return (x.astype(jnp.float32) * inv + shift).astype(dtype)

    def batch_moments(self, x, features: int):
        """(mean, biased variance, count) of x over every axis but the channels, in float32;
        with ``axis_name``, of the whole batch over that mesh axis."""
        reduce_axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=reduce_axes)
        mean_sq = jnp.mean(jnp.square(x32), axis=reduce_axes)
        count = x.size // features
        if self.axis_name is not None and not self.is_initializing():
            mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
            count = count * jax.lax.axis_size(self.axis_name)
        return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0), count


@functools.lru_cache(maxsize=None)
def chunked_weight_grad_conv(chunk: int):
    """``lax.conv_general_dilated`` (for ``nn.Conv(conv_general_dilated=...)``) whose kernel
    gradient is summed over slices of ``chunk`` examples instead of taken over the whole batch.

    The forward pass and the input gradient are the plain ones; only the kernel gradient's
    order of summation changes. Why: XLA:CPU computes a kernel gradient over a large batch
    several times slower than the same work over slices of it (measured on a 2-core x86 CPU,
    batch 128: 3x3 convs 32x32x32 104 -> 32 ms, 16x16x64 76 -> 26 ms, 8x8x128 41 -> 20 ms with
    slices of 8; a vmap or scan over the slices is slower than the plain gradient). The slices
    are unrolled, their float32 sum cast to the kernel's dtype. A batch that ``chunk`` does not
    divide into several slices gets the plain gradient; ``chunk <= 0`` gives None, which makes
    ``nn.Conv`` use ``lax.conv_general_dilated`` itself.
    """
    if chunk <= 0:
        return None

    def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                             precision=None, preferred_element_type=None):
        conv = lambda x, w: jax.lax.conv_general_dilated(
            x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
        numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        in_batch, out_batch = numbers.lhs_spec[0], numbers.out_spec[0]
        batch = lhs.shape[in_batch]
        if batch % chunk or batch == chunk:
            return conv(lhs, rhs)

        @jax.custom_vjp
        def chunked(x, w):
            return conv(x, w)

        def forward(x, w):
            return conv(x, w), (x, w)

        def backward(residuals, g):
            x, w = residuals
            dx = jax.vjp(lambda x: conv(x, w), x)[1](g)[0]
            dw = jnp.zeros(w.shape, jnp.float32)
            for start in range(0, batch, chunk):
                x_slice = jax.lax.slice_in_dim(x, start, start + chunk, axis=in_batch)
                g_slice = jax.lax.slice_in_dim(g, start, start + chunk, axis=out_batch)
                dw += jax.vjp(lambda w: conv(x_slice, w), w)[1](g_slice)[0].astype(jnp.float32)
            return dx, dw.astype(w.dtype)

        chunked.defvjp(forward, backward)
        return chunked(lhs, rhs)

    return conv_general_dilated


def conv_function(weight_grad_chunk: int = 0, convolution: str = 'xla'):
    """The convolution of every conv layer, for ``nn.Conv(conv_general_dilated=...)``: oneDNN's
    (``zskt_jax.onednn``) where ``convolution == 'onednn'`` and it runs here, else
    ``chunked_weight_grad_conv(weight_grad_chunk)``, which is None (XLA's own) for 0. Both levers
    only change the floating-point order of the sums, for XLA:CPU's speed; the slices are unused
    under oneDNN."""
    if convolution == 'onednn':
        from zskt_jax import onednn  # builds its library on first use
        if onednn.usable()[0]:
            return onednn.conv_general_dilated
    return chunked_weight_grad_conv(weight_grad_chunk)

