from zskt_jax.models.generator import Generator
from zskt_jax.models.wide_resnet import WideResNet, build_wide_resnet, parse_arch
from zskt_jax.models.resnet import ResNet
from zskt_jax.models.vgg import VGG
from zskt_jax.models import registry
from zskt_jax.models.registry import build, names, stages
