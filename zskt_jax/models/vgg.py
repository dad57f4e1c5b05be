"""The CIFAR VGG-11 (with BatchNorm) of the zju-vipa/CMI toolbox (github.com/zju-vipa/CMI,
``datafree/models/classifiers/vgg.py``, after RepDistiller's), for Flax. The toolbox's name
``vgg11`` builds ``vgg11_bn``: configuration "A" with BatchNorm.

NHWC. Five blocks of 3x3 convs (pad 1, WITH bias) each followed by BN, with a ReLU between the
convs of a block and after the block (the toolbox's ``_make_layers`` drops the block's last ReLU;
``forward`` applies it). Channels per block, "A": [64], [128], [256, 256], [512, 512],
[512, 512], here scaled by ``width`` / 64. A 2x2 max-pool (stride 2) follows blocks 0, 1 and 2;
the one after block 3 applies only to 64x64 inputs (``forward``'s ``if h == 64``); block 4 is
followed by a global average pool and ``classifier``, one Linear(512 -> classes). No dropout.

Returns the logits and the five blocks' outputs after their ReLU, before any pool (RepDistiller's
feature maps f0 ... f4; the toolbox's ``forward`` exposes only the pooled vector): at 32x32
inputs 32x32x64, 16x16x128, 8x8x256, 4x4x512, 4x4x512 (at 64x64: 64, 32, 16, 8, 4).

Module names are the PyTorch state-dict keys with '.' written '_': block 2's Sequential is
[conv, bn, relu, conv, bn], so its modules are ``block2_0``, ``block2_1``, ``block2_3``,
``block2_4``.

Init as the toolbox's ``_initialize_weights``: conv weights N(0, sqrt(2 / (k * k * out))) (He,
fan-out), conv biases 0; BN scale 1, bias 0; the linear weight N(0, 0.01), its bias 0.
"""
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from zskt_jax.models.layers import BatchNorm, conv_function

PAD1 = ((1, 1), (1, 1))
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
DEFAULT_WIDTH = 64
# Per block, each conv's channels as a multiple of the base width (the toolbox's cfg "A" / 64).
CONFIGS = {'vgg11': ((1,), (2,), (4, 4), (8, 8), (8, 8))}


class VGG(nn.Module):
    """VGG with BatchNorm; ``config``: per block, each conv's channels as a multiple of
    ``width`` (64 in the toolbox; other values for tests and CPU demos)."""
    config: Sequence[Sequence[int]]
    num_classes: int
    width: int = DEFAULT_WIDTH
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: [B, H, W, 3] normalised images -> (logits [B, classes], (b0, b1, b2, b3, b4))."""
        pool_after_block3 = x.shape[1] == 64  # the toolbox's ``if h == 64: x = self.pool3(x)``
        x = x.astype(self.dtype)
        block_outputs = []
        for b, multiples in enumerate(self.config):
            for j, m in enumerate(multiples):
                if j:
                    x = nn.relu(x)
                x = nn.Conv(self.width * m, (3, 3), padding=PAD1, use_bias=True,
                            kernel_init=conv_init, bias_init=nn.initializers.zeros,
                            dtype=self.dtype, name=f'block{b}_{3 * j}',
                            conv_general_dilated=conv_function(
                                self.weight_grad_chunk, self.convolution))(x)
                x = BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                              dtype=self.dtype, name=f'block{b}_{3 * j + 1}')(x)
            x = nn.relu(x)
            block_outputs.append(x)  # [B, H_b, W_b, C_b], after the ReLU, before any pool
            if b < 3 or (b == 3 and pool_after_block3):
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d((1, 1))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='classifier',
                          kernel_init=nn.initializers.normal(0.01),
                          bias_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32), tuple(block_outputs)


def stage_sizes(image_size: int) -> tuple:
    """Spatial size of each block's output for square inputs of ``image_size`` (the 2x2 pools
    floor)."""
    s0 = image_size
    s1, s2, s3 = s0 // 2, s0 // 4, s0 // 8
    return (s0, s1, s2, s3, s3 // 2 if image_size == 64 else s3)


def stage_channels(width: int = DEFAULT_WIDTH, name: str = 'vgg11') -> tuple:
    return tuple(width * block[-1] for block in CONFIGS[name])


def build_vgg(name: str, num_classes: int, width: int = DEFAULT_WIDTH,
              axis_name: Optional[str] = None, dtype: Any = jnp.float32,
              weight_grad_chunk: int = 0, convolution: str = 'xla') -> VGG:
    """'vgg11' (the toolbox's name; with BatchNorm)."""
    return VGG(config=CONFIGS[name], num_classes=num_classes, width=width, axis_name=axis_name,
               dtype=dtype, weight_grad_chunk=weight_grad_chunk, convolution=convolution)
