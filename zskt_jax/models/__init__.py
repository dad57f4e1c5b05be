from zskt_jax.models.generator import Generator
from zskt_jax.models.wide_resnet import WideResNet, build_wide_resnet, parse_arch
