"""Classifier architectures by name: the project's WideResNets and the zju-vipa/CMI toolbox's
CIFAR classifiers (github.com/zju-vipa/CMI, ``registry.py``'s MODEL_DICT).

    from zskt_jax.models import registry
    model = registry.build('resnet34', num_classes=10)           # a Flax module
    registry.names()                                              # the names listed
    registry.stages('resnet34', 32)                               # its feature stages at 32x32

Names: the toolbox's ``resnet18``, ``resnet34``, ``vgg11`` (with BatchNorm, as the toolbox
builds it) and ``wrn16_1``, ``wrn16_2``, ``wrn40_1``, ``wrn40_2`` (any ``wrn<depth>_<k>``), and
the project's ``WRN-<depth>-<k>``. A toolbox WRN name is the same network as the project's
(``canonical_name('wrn40_2') == 'WRN-40-2'``; the toolbox's wresnet.py is the ZSKT authors'
WideResNet, state-dict keys included).

Every model's ``apply(variables, x, train=False)`` returns ``(logits, stage_outputs)``;
``stages(name, image_size)`` says what the stage outputs are (name, spatial size, channels)
without building anything, for deciding which teacher and student stages attention transfer
pairs up.

Options of ``build``: ``width`` (the stem/base width: 16 for WRNs, 64 for the ResNets and VGG;
``base_width`` is accepted as its synonym, the config field's name), ``axis_name``, ``dtype``,
``weight_grad_chunk``, each as the WideResNet's.
"""
import inspect
import re
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple

from zskt_jax.errors import ConfigError
from zskt_jax.models import resnet, vgg
from zskt_jax.models.wide_resnet import build_wide_resnet, parse_arch


class Stage(NamedTuple):
    """One stage output: its name, spatial size (square inputs) and channels."""
    name: str
    size: int
    channels: int


class Architecture(NamedTuple):
    name: str                   # canonical: 'WRN-40-2', 'resnet18', 'vgg11'
    family: str                 # 'wrn' | 'resnet' | 'vgg' | 'user'
    default_width: int          # the stem/base width of the published networks
    builder: Callable[..., Any]  # (num_classes, width, **options) -> module
    stage_list: Callable[[int, int], Sequence[Tuple[str, int, int]]]  # (image size, width) ->
                                                # (name, spatial size, channels) of each stage

    def build(self, num_classes: int, width: Optional[int] = None, **options):
        return self.builder(num_classes, self.default_width if width is None else width,
                            **options)

    def stages(self, image_size: int, width: Optional[int] = None) -> Tuple[Stage, ...]:
        width = self.default_width if width is None else width
        return tuple(Stage(*s) for s in self.stage_list(image_size, width))


def _stage_list(names: Sequence[str], sizes: Callable[[int], Sequence[int]],
                channels: Callable[[int], Sequence[int]]):
    """(image size, width) -> the stages named ``names``, of ``sizes(image size)`` pixels and
    ``channels(width)`` channels."""
    return lambda image_size, width: tuple(zip(names, sizes(image_size), channels(width)))


TOOLBOX_NAMES = ('resnet18', 'resnet34', 'vgg11', 'wrn16_1', 'wrn16_2', 'wrn40_1', 'wrn40_2')


def canonical_name(name: str) -> str:
    """'wrn40_2' -> 'WRN-40-2'; other names unchanged."""
    match = re.fullmatch(r'wrn(\d+)_(\d+)', name)
    return f'WRN-{match.group(1)}-{match.group(2)}' if match else name


def _wide_resnet(name: str) -> Architecture:
    depth, k = parse_arch(name)  # ConfigError for a bad depth

    def sizes(s):
        return (s, -(-s // 2), -(-s // 4))

    return Architecture(
        name=name, family='wrn', default_width=16,
        builder=lambda num_classes, width, **options: build_wide_resnet(
            name, num_classes, width, **options),
        stage_list=_stage_list(('block1', 'block2', 'block3'), sizes,
                               lambda width: (width * k, 2 * width * k, 4 * width * k)))


def _resnet(name: str) -> Architecture:
    return Architecture(
        name=name, family='resnet', default_width=resnet.DEFAULT_WIDTH,
        builder=lambda num_classes, width, **options: resnet.build_resnet(
            name, num_classes, width, **options),
        stage_list=_stage_list(('layer1', 'layer2', 'layer3', 'layer4'), resnet.stage_sizes,
                               resnet.stage_channels))


def _vgg(name: str) -> Architecture:
    return Architecture(
        name=name, family='vgg', default_width=vgg.DEFAULT_WIDTH,
        builder=lambda num_classes, width, **options: vgg.build_vgg(
            name, num_classes, width, **options),
        stage_list=_stage_list(tuple(f'block{b}' for b in range(len(vgg.CONFIGS[name]))),
                               vgg.stage_sizes, lambda width: vgg.stage_channels(width, name)))


# ----------------------------------------------------------------------------------------------
# Architectures of the user's own (docs/own_teacher.md)

_REGISTERED: Dict[str, Architecture] = {}


class UserModule:
    """A user's Flax module as the jobs call a registered network: ``apply`` returns
    ``(logits, stage_outputs)`` (stage outputs () where the module returns logits alone), and
    the keyword ``train`` reaches the module only if its ``__call__`` takes it."""

    def __init__(self, module):
        self.module = module
        self.takes_train = 'train' in inspect.signature(type(module).__call__).parameters

    def _kwargs(self, kwargs):
        return kwargs if self.takes_train else {k: v for k, v in kwargs.items() if k != 'train'}

    def init(self, rngs, *args, **kwargs):
        return self.module.init(rngs, *args, **self._kwargs(kwargs))

    def apply(self, variables, *args, **kwargs):
        result = self.module.apply(variables, *args, **self._kwargs(kwargs))
        if kwargs.get('mutable'):
            outputs, state = result
            return self._pair(outputs), state
        return self._pair(result)

    @staticmethod
    def _pair(outputs):
        if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
            return outputs[0], tuple(outputs[1])
        return outputs, ()


def register(name: str, build: Callable[..., Any],
             stages: Optional[Callable[[int], Sequence[Tuple[str, int, int]]]] = None,
             default_width: int = 0) -> None:
    """Make a network of your own available by name, as a teacher (``config.teacher.arch``).

    ``build(num_classes, **options)``: returns a Flax module whose ``apply(variables, x)`` gives
    the logits, or ``(logits, stage_outputs)``; ``options`` are the registry's (``width``,
    ``axis_name``, ``dtype``, ``weight_grad_chunk``): take the ones the module uses, ignore the
    rest (``**_``). ``stages(image_size)``: its stage outputs as (name, spatial size, channels)
    in the order the module returns them, for attention transfer; None: no stages (then the run
    needs ``beta = 0``). Registering a name the registry already knows is refused."""
    try:
        get(name)
    except ConfigError:
        pass
    else:
        raise ConfigError(f'architecture {name!r} is already registered')
    _REGISTERED[name] = Architecture(
        name=name, family='user', default_width=default_width,
        builder=lambda num_classes, width, **options: UserModule(
            build(num_classes, width=width, **options)),
        stage_list=lambda image_size, width: tuple(stages(image_size)) if stages else ())


def unregister(name: str) -> None:
    """Forget an architecture ``register`` added."""
    _REGISTERED.pop(name, None)


def names() -> Tuple[str, ...]:
    """The names listed: the toolbox's, then the project's WRN examples (any
    'WRN-<6n+4>-<k>' / 'wrn<6n+4>_<k>' is accepted), then those registered."""
    return TOOLBOX_NAMES + ('WRN-16-1', 'WRN-16-2', 'WRN-40-1', 'WRN-40-2') + tuple(_REGISTERED)


def get(name: str) -> Architecture:
    """The architecture called ``name``, or a ConfigError listing the names."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    canonical = canonical_name(name)
    if canonical.startswith('WRN-'):
        return _wide_resnet(canonical)
    if canonical in resnet.BLOCKS:
        return _resnet(canonical)
    if canonical in vgg.CONFIGS:
        return _vgg(canonical)
    raise ConfigError(f'unknown architecture {name!r}; known: {", ".join(names())} '
                      "(and any 'WRN-<depth>-<k>' or 'wrn<depth>_<k>' with depth 6n + 4)")


def build(name: str, num_classes: int, width: Optional[int] = None,
          base_width: Optional[int] = None, **options):
    """The Flax module of architecture ``name``; ``options``: axis_name, dtype,
    weight_grad_chunk."""
    if width is not None and base_width is not None and width != base_width:
        raise ConfigError(f'width={width} and base_width={base_width} are the same option')
    return get(name).build(num_classes, width if width is not None else base_width, **options)


def stages(name: str, image_size: int, width: Optional[int] = None) -> Tuple[Stage, ...]:
    """The stage outputs of ``name`` at square inputs of ``image_size``, in the order the model
    returns them."""
    return get(name).stages(image_size, width)


def stage_sizes(name: str, image_size: int) -> Tuple[int, ...]:
    return tuple(stage.size for stage in stages(name, image_size))
