"""The CIFAR ResNet-18/34 of the zju-vipa/CMI toolbox (github.com/zju-vipa/CMI,
``datafree/models/classifiers/resnet.py``, itself DAFL's CIFAR ResNet), the field's data-free
distillation benchmark classifiers, written for Flax.

NHWC. The stem is a 3x3 conv (stride 1, pad 1, no bias) -> BN -> ReLU with no max-pool; then
four layers of post-activation BasicBlocks with widths (1, 2, 4, 8) * ``width`` (64 in the
toolbox) and first strides 1, 2, 2, 2; global average pool; ``linear`` (with bias).
BasicBlock: conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (identity, or a
1x1 conv(stride, no bias) -> BN when the stride is not 1 or the channels change), then ReLU.

Returns the logits and the outputs of the four layers (after their last ReLU): at 32x32 inputs
32x32, 16x16, 8x8 and 4x4, with 64, 128, 256 and 512 channels at the toolbox's width. These are
the stage outputs attention transfer may compare.

Module names follow the PyTorch state-dict keys with '.' written '_' (``layer2.0.shortcut.0``
-> ``layer2_0/shortcut_0``), so that importing the toolbox's checkpoints is a renaming
(``zskt_jax.import_torch``).

Init: the toolbox's file sets none, so PyTorch's defaults: conv and linear weights
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)), the linear bias with the
same bound, BatchNorm scale 1 and bias 0.
"""
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from zskt_jax.models.layers import BatchNorm, conv_function, torch_uniform

PAD1 = ((1, 1), (1, 1))  # 3x3 convs pad 1 on every side, as torch (not 'SAME' at stride 2)

BLOCKS = {'resnet18': (2, 2, 2, 2), 'resnet34': (3, 4, 6, 3)}
DEFAULT_WIDTH = 64


def _conv(features, kernel, stride, padding, in_channels, dtype, weight_grad_chunk, convolution,
          name):
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=padding, use_bias=False,
                   kernel_init=torch_uniform(kernel * kernel * in_channels), dtype=dtype,
                   name=name, conv_general_dilated=conv_function(weight_grad_chunk, convolution))


class BasicBlock(nn.Module):
    """Post-activation basic block (expansion 1)."""
    out_channels: int
    stride: int
    train: bool
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, x):
        norm = lambda name: BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                                      dtype=self.dtype, name=name)
        conv = lambda k, s, pad, fan_in_ch, name: _conv(
            self.out_channels, k, s, pad, fan_in_ch, self.dtype, self.weight_grad_chunk,
            self.convolution, name)
        in_channels = x.shape[-1]
        out = nn.relu(norm('bn1')(conv(3, self.stride, PAD1, in_channels, 'conv1')(x)))
        out = norm('bn2')(conv(3, 1, PAD1, self.out_channels, 'conv2')(out))
        if self.stride != 1 or in_channels != self.out_channels:
            x = norm('shortcut_1')(conv(1, self.stride, 'VALID', in_channels, 'shortcut_0')(x))
        return nn.relu(out + x)


class ResNet(nn.Module):
    """CIFAR ResNet with ``blocks`` BasicBlocks per layer ((2, 2, 2, 2): ResNet-18; (3, 4, 6, 3):
    ResNet-34). ``width`` other than 64 exists for tests and CPU demos (tiny networks); the
    toolbox's networks have 64. ``weight_grad_chunk`` and ``convolution``: faster convolutions on
    XLA:CPU (``layers.conv_function``), off by default."""
    blocks: Sequence[int]
    num_classes: int
    width: int = DEFAULT_WIDTH
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: [B, H, W, 3] normalised images -> (logits [B, classes], (l1, l2, l3, l4))."""
        x = x.astype(self.dtype)
        x = _conv(self.width, 3, 1, PAD1, x.shape[-1], self.dtype, self.weight_grad_chunk,
                  self.convolution, 'conv1')(x)
        x = nn.relu(BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                              dtype=self.dtype, name='bn1')(x))
        layer_outputs = []
        for l, (n, stride) in enumerate(zip(self.blocks, (1, 2, 2, 2)), start=1):
            for i in range(n):
                x = BasicBlock(self.width * 2 ** (l - 1), stride if i == 0 else 1, train,
                               self.axis_name, self.dtype, self.weight_grad_chunk, self.convolution,
                               name=f'layer{l}_{i}')(x)
            layer_outputs.append(x)  # [B, H_l, W_l, C_l], after the block's ReLU
        # Adaptive average pool to 1x1; the classifier in float32 whatever the activation dtype
        # (as the WideResNet's: bf16 logits would blur the KL differences distillation uses).
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        fan_in = x.shape[-1]
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='linear',
                          kernel_init=torch_uniform(fan_in), bias_init=torch_uniform(fan_in))(x)
        return logits.astype(jnp.float32), tuple(layer_outputs)


def stage_sizes(image_size: int) -> tuple:
    """Spatial size of each layer's output for square inputs of ``image_size``: a 3x3 conv with
    pad 1 (or a 1x1 with pad 0) at stride 2 maps s to ceil(s / 2)."""
    sizes, s = [], image_size
    for stride in (1, 2, 2, 2):
        s = -(-s // stride)
        sizes.append(s)
    return tuple(sizes)


def stage_channels(width: int = DEFAULT_WIDTH) -> tuple:
    return tuple(width * m for m in (1, 2, 4, 8))


def build_resnet(name: str, num_classes: int, width: int = DEFAULT_WIDTH,
                 axis_name: Optional[str] = None, dtype: Any = jnp.float32,
                 weight_grad_chunk: int = 0, convolution: str = 'xla') -> ResNet:
    """'resnet18' | 'resnet34' (the toolbox's names)."""
    return ResNet(blocks=BLOCKS[name], num_classes=num_classes, width=width, axis_name=axis_name,
                  dtype=dtype, weight_grad_chunk=weight_grad_chunk, convolution=convolution)
