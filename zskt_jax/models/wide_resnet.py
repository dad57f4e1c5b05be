"""WideResNet WRN-depth-k (Zagoruyko & Komodakis) exactly as the ZSKT authors' code builds it.

NHWC. Returns the logits and the raw outputs of the three groups (before the head's BN/ReLU),
which attention transfer compares (docs/method.md, section "WideResNet"). Module names follow
the PyTorch state-dict keys (``block{g}.layer.{i}.bn1`` -> ``block{g}/layer_{i}/bn1``) so that
importing the authors' checkpoints is a renaming.

The zju-vipa/CMI toolbox's WideResNet (github.com/zju-vipa/CMI,
``datafree/models/classifiers/wresnet.py``, taken from the authors' code) is this network with
the same state-dict keys; its names ``wrn16_1`` ... ``wrn40_2`` build this module
(``models.registry``) and its checkpoints import as the authors' do.
"""
import re
from typing import Any, Optional, Tuple

import jax.numpy as jnp
import flax.linen as nn

from zskt_jax.errors import ConfigError
from zskt_jax.models.layers import BatchNorm, conv_function

# He init, fan-out: N(0, sqrt(2 / (k * k * out_channels))) (docs/method.md, section "WideResNet").
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# 3x3 convs pad 1 on every side; 'SAME' pads asymmetrically at stride 2 and does not match torch.
PAD1 = ((1, 1), (1, 1))


def parse_arch(arch: str) -> Tuple[int, int]:
    """'WRN-40-2' -> (40, 2), with a message a person can act on."""
    match = re.fullmatch(r'WRN-(\d+)-(\d+)', arch)
    if not match:
        raise ConfigError(f"architecture {arch!r} is not of the form 'WRN-<depth>-<width>', "
                         "e.g. 'WRN-40-2'")
    depth, width = int(match.group(1)), int(match.group(2))
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ConfigError(f'WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); '
                         f'{arch!r} has depth {depth}')
    return depth, width


class BasicBlock(nn.Module):
    """Pre-activation basic block (dropout 0)."""
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
        conv = lambda ch, k, s, pad, name: nn.Conv(
            ch, (k, k), (s, s), padding=pad, use_bias=False, kernel_init=conv_init,
            dtype=self.dtype, name=name,
            conv_general_dilated=conv_function(self.weight_grad_chunk, self.convolution))
        equal_in_out = x.shape[-1] == self.out_channels
        activated = nn.relu(norm('bn1')(x))
        if not equal_in_out:
            # The first block of a group: the shortcut sees the ACTIVATED input (docs/method.md).
            x = activated
        out = conv(self.out_channels, 3, self.stride, PAD1, 'conv1')(activated)
        out = nn.relu(norm('bn2')(out))
        out = conv(self.out_channels, 3, 1, PAD1, 'conv2')(out)
        if equal_in_out:
            return x + out
        shortcut = conv(self.out_channels, 1, self.stride, 'VALID', 'convShortcut')(x)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-width; channels [base, base*k, 2*base*k, 4*base*k] (base 16 in the paper).

    ``base_width`` other than 16 exists only so that CPU demo configs can use thinner networks;
    every paper config keeps 16. ``weight_grad_chunk`` and ``convolution``: faster convolutions
    on XLA:CPU (``layers.conv_function``), off by default.
    """
    depth: int
    width: int
    num_classes: int
    base_width: int = 16
    axis_name: Optional[str] = None
    dtype: Any = jnp.float32
    weight_grad_chunk: int = 0
    convolution: str = 'xla'

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: [B, H, W, 3] normalised images -> (logits [B, classes], (g1, g2, g3))."""
        blocks_per_group = (self.depth - 4) // 6
        channels = [self.base_width * m for m in (self.width, 2 * self.width, 4 * self.width)]
        x = x.astype(self.dtype)
        x = nn.Conv(self.base_width, (3, 3), padding=PAD1, use_bias=False, kernel_init=conv_init,
                    dtype=self.dtype, name='conv1',
                    conv_general_dilated=conv_function(self.weight_grad_chunk, self.convolution))(x)
        group_outputs = []
        for g, (ch, stride) in enumerate(zip(channels, (1, 2, 2)), start=1):
            for i in range(blocks_per_group):
                x = BasicBlock(ch, stride if i == 0 else 1, train, self.axis_name, self.dtype,
                               self.weight_grad_chunk, self.convolution,
                               name=f'block{g}_layer_{i}')(x)
            group_outputs.append(x)  # [B, H_g, W_g, C_g], before the head's BN/ReLU
        x = nn.relu(BatchNorm(use_running_average=not train, axis_name=self.axis_name,
                              dtype=self.dtype, name='bn1')(x))
        # Global average pool (8x8 at 32x32 inputs). The classifier runs in float32 whatever
        # the activation dtype: bf16 logits (8 bits of mantissa) would blur the small KL
        # differences that drive distillation. It costs nothing next to the convolutions.
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name='fc',
                          kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                          bias_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32), tuple(group_outputs)


def build_wide_resnet(arch: str, num_classes: int, base_width: int = 16,
                      axis_name: Optional[str] = None, dtype: Any = jnp.float32,
                      weight_grad_chunk: int = 0, convolution: str = 'xla') -> WideResNet:
    depth, width = parse_arch(arch)
    return WideResNet(depth=depth, width=width, num_classes=num_classes, base_width=base_width,
                      axis_name=axis_name, dtype=dtype, weight_grad_chunk=weight_grad_chunk,
                      convolution=convolution)
