"""Layers shared by the WideResNet and the generator, matching PyTorch's semantics."""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


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

    Differences from ``flax.linen.BatchNorm`` that REFERENCE.md cares about: the running variance
    is updated with the UNBIASED batch variance (n / (n - 1)), as torch does. With ``axis_name``
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
        reduce_axes = tuple(range(x.ndim - 1))
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
        scale = self.param('scale', nn.initializers.ones, (features,)) if self.use_scale else None
        bias = self.param('bias', nn.initializers.zeros, (features,)) if self.use_bias else None

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            x32 = x.astype(jnp.float32)
            mean = jnp.mean(x32, axis=reduce_axes)
            mean_sq = jnp.mean(jnp.square(x32), axis=reduce_axes)
            count = x.size // features
            if self.axis_name is not None and not self.is_initializing():
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
                count = count * jax.lax.axis_size(self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
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
