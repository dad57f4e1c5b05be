"""The paper's generator (REFERENCE.md, "Generator"; 1,051,145 parameters at the defaults)."""
from typing import Any, Optional

import jax.numpy as jnp
import flax.linen as nn

from zskt_jax.models.layers import BatchNorm, chunked_weight_grad_conv, torch_uniform


def upsample_nearest(x, factor: int = 2):
    """[B, H, W, C] -> [B, factor*H, factor*W, C], nearest neighbour (torch nn.Upsample)."""
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


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
    weight_grad_chunk: int = 0    # layers.chunked_weight_grad_conv (faster on XLA:CPU)

    @nn.compact
    def __call__(self, z, train: bool = True):
        norm = lambda name, **kw: BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                                            dtype=self.dtype, name=name, **kw)

        def conv(x, ch, name):
            fan_in = x.shape[-1] * 9
            return nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=name,
                           kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in),
                           conv_general_dilated=chunked_weight_grad_conv(self.weight_grad_chunk))(x)

        z_dim = z.shape[-1]
        x = nn.Dense(self.hidden * self.init_size ** 2, dtype=self.dtype, name='fc',
                     kernel_init=torch_uniform(z_dim), bias_init=torch_uniform(z_dim))(z.astype(self.dtype))
        # torch reshapes to [B, C, H, W]; we keep NHWC.
        x = x.reshape(x.shape[0], self.hidden, self.init_size, self.init_size).transpose(0, 2, 3, 1)
        x = norm('bn0')(x)
        x = upsample_nearest(x)
        x = nn.leaky_relu(norm('bn1')(conv(x, self.hidden, 'conv1')), 0.2)
        x = upsample_nearest(x)
        x = nn.leaky_relu(norm('bn2')(conv(x, self.hidden // 2, 'conv2')), 0.2)
        x = norm('bn3')(conv(x, self.out_channels, 'conv3'))  # BN(3) with scale and bias
        return x.astype(jnp.float32)
