"""The paper's generator (docs/method.md, section "Generator"; 1,051,145 parameters at the
defaults)."""
from typing import Any, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from zskt_jax.models.layers import BatchNorm, conv_function, torch_uniform


def _phase_taps(kernel, axis: int):
    """A 3-tap kernel along ``axis`` seen from the x2 nearest-upsampled grid's two phases.

    Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i: taps
    (k0, k1 + k2) at input offsets (-1, 0). Row 2i+1 reads rows i, i, i+1: taps (k0 + k1, k2) at
    offsets (0, +1). Returns the two 2-tap kernels and the padding each needs.
    """
    k0, k1, k2 = (jax.lax.index_in_dim(kernel, i, axis) for i in range(3))
    return ((jnp.concatenate([k0, k1 + k2], axis), (1, 0)),
            (jnp.concatenate([k0 + k1, k2], axis), (0, 1)))


def upsample_conv3x3(x, kernel, conv=jax.lax.conv_general_dilated):
    """A 3x3 conv (padding 1) of x upsampled x2 by nearest neighbour, without the upsampled tensor.

    Each of the four output phases (row parity x column parity) is a 2x2 convolution of the
    low-resolution input with summed taps (``_phase_taps``): 16 instead of 36 multiply-adds per
    input pixel and channel pair, forward and backward, and no gradient through the upsampling.
    The same function as the authors' Upsample + Conv2d up to float32 rounding (tested).
    x: [B, H, W, Ci], kernel: [3, 3, Ci, Co] (HWIO) -> [B, 2H, 2W, Co]. The taps are summed in
    the kernel's dtype (float32 parameters), then cast to x's (the compute dtype).
    """
    batch, height, width, _ = x.shape
    phases = [[conv(x, k.astype(x.dtype), (1, 1), (row_pad, col_pad),
                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
               for k, col_pad in _phase_taps(row_kernel, 1)]
              for row_kernel, row_pad in _phase_taps(kernel, 0)]
    # phases[a][b][n, i, j] is output pixel (2i + a, 2j + b): interleave to [B, H, 2, W, 2, Co].
    out = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)
    return out.reshape(batch, 2 * height, 2 * width, kernel.shape[-1])


class UpsampleConv(nn.Module):
    """x2 nearest upsampling then a 3x3 conv with bias (torch: nn.Upsample + nn.Conv2d), as one
    layer computed by ``upsample_conv3x3``. Parameters as ``nn.Conv``'s: kernel [3, 3, Ci, Co]
    and bias [Co], PyTorch's default init, so checkpoints and imports see no difference."""
    features: int
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1] * 9
        kernel = self.param('kernel', torch_uniform(fan_in), (3, 3, x.shape[-1], self.features))
        bias = self.param('bias', torch_uniform(fan_in), (self.features,))
        conv = (conv_function(self.weight_grad_chunk, self.convolution)
                or jax.lax.conv_general_dilated)
        return upsample_conv3x3(x.astype(self.dtype), kernel, conv) + bias.astype(self.dtype)


class Generator(nn.Module):
    """z [B, z_dim] -> images [B, 4*init_size, 4*init_size, channels] in the teacher's
    normalised input space: the last layer is a BatchNorm, there is no tanh.

    Default PyTorch init everywhere (kaiming-uniform a = sqrt(5): U(+-1/sqrt(fan_in)) for weights
    and biases). The generator always runs its BatchNorms in training mode during distillation;
    ``train=False`` (running statistics) is for drawing sample images only.
    """
    init_size: int = 8        # 32x32 images after two x2 upsamplings
    hidden: int = 128         # channels after the Dense layer and the first conv
    out_channels: int = 3
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0    # layers.conv_function: faster convolutions on XLA:CPU
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, z, train: bool = True):
        norm = lambda name, **kw: BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                                            dtype=self.dtype, name=name, **kw)

        def upsample_conv(x, ch, name):
            return UpsampleConv(ch, self.dtype, self.weight_grad_chunk, self.convolution,
                                name=name)(x)

        def conv(x, ch, name):
            fan_in = x.shape[-1] * 9
            return nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=name,
                           kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in),
                           conv_general_dilated=conv_function(self.weight_grad_chunk,
                                                                  self.convolution))(x)

        z_dim = z.shape[-1]
        x = nn.Dense(self.hidden * self.init_size ** 2, dtype=self.dtype, name='fc',
                     kernel_init=torch_uniform(z_dim), bias_init=torch_uniform(z_dim))(z.astype(self.dtype))
        # torch reshapes to [B, C, H, W]; we keep NHWC.
        x = x.reshape(x.shape[0], self.hidden, self.init_size, self.init_size).transpose(0, 2, 3, 1)
        x = norm('bn0')(x)
        # Upsample x2 then conv, twice (torch: nn.Upsample(scale_factor=2) + nn.Conv2d).
        x = nn.leaky_relu(norm('bn1')(upsample_conv(x, self.hidden, 'conv1')), 0.2)
        x = nn.leaky_relu(norm('bn2')(upsample_conv(x, self.hidden // 2, 'conv2')), 0.2)
        x = norm('bn3')(conv(x, self.out_channels, 'conv3'))  # BN(3) with scale and bias
        return x.astype(jnp.float32)
