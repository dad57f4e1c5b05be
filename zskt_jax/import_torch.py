"""Import published PyTorch teachers: the ZSKT authors' WideResNets (docs/method.md, section "The
authors' checkpoints") and the zju-vipa/CMI toolbox's CIFAR classifiers (github.com/zju-vipa/CMI:
``resnet18``, ``resnet34``, ``vgg11`` and its WRNs ``wrn16_1`` ... ``wrn40_2``, whose
``datafree/models/classifiers/wresnet.py`` is the authors' WideResNet, state-dict keys included).

    pip install torch==2.13.0   # only this command needs PyTorch (a CPU build is enough)
    python -m zskt_jax.import_torch --checkpoint=pretrained/svhn/WRN-40-2/last.pth.tar \\
        --arch=WRN-40-2 --dataset=svhn

    python -m zskt_jax.import_torch --checkpoint=cifar10_resnet34.pth --arch=resnet34 \\
        --dataset=cifar10

writes ``runs/teacher_svhn_WRN-40-2/teacher`` (``--out`` to choose), exactly where
``python run.py --config=configs/svhn.py`` looks for its teacher by default
(``common.teacher_dir``). ``--arch`` takes any name of ``zskt_jax.models.registry``; a toolbox
WRN name is stored under the project's (``wrn40_2`` -> ``WRN-40-2``). The checkpoint may be a
``{'state_dict': ...}`` dict (the authors' and the toolbox's format) or a bare state dict, with
or without the ``module.`` prefix of ``nn.DataParallel``.

The conversion is a renaming plus layout changes: conv OIHW -> HWIO, linear [out, in] ->
[in, out], BatchNorm weight/bias/running_mean/running_var -> scale/bias (params) and mean/var
(batch_stats); ``num_batches_tracked`` is dropped. The expected keys are derived from the Flax
model itself (``flax_layout``): its modules are named after the PyTorch modules with '.' written
'_'. Every tensor's shape is checked against the named architecture before anything is written.
When the dataset is prepared, the imported teacher's test accuracy is measured and recorded in
``teacher.json``.

A checkpoint that is not the named architecture (another one, a missing key, another number of
classes) is a person's error: ``main`` prints it and returns 1, and the command
(``python -m zskt_jax.import_torch``) exits with ``errors.EXIT_STATUS`` (2), as the launchers do,
without a traceback.
"""
import argparse
import logging
import os
import re
import sys
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from zskt_jax import errors, paths
from zskt_jax.models import registry
from zskt_jax.models.wide_resnet import parse_arch

logger = logging.getLogger('zskt_jax')

BN_TO_FLAX = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
IGNORED_SUFFIXES = ('.num_batches_tracked',)
TORCH_INSTALL_HINT = ('pip install torch==2.13.0  (a CPU build is enough; only '
                      'zskt_jax.import_torch needs PyTorch)')


class StateDictMismatchError(errors.UserError, ValueError):
    """The checkpoint is not the architecture it was said to be."""


class TensorSpec(NamedTuple):
    """One tensor of the authors' WideResNet state dict and where it goes in ours."""
    torch_key: str                  # e.g. 'block1.layer.0.conv1.weight'
    torch_shape: Tuple[int, ...]    # its shape in the PyTorch layout
    collection: str                 # 'params' | 'batch_stats'
    flax_path: Tuple[str, ...]      # e.g. ('block1_layer_0', 'conv1', 'kernel')
    kind: str                       # 'conv' | 'dense_kernel' | 'vector'


def torch_layout(arch: str, num_classes: int, base_width: int = 16) -> List[TensorSpec]:
    """The tensors of the authors' WRN-depth-k state dict, in its order (docs/method.md,
    section "The authors' checkpoints"):
    conv1; block{g}.layer.{i}.{bn1, conv1, bn2, conv2, convShortcut}; bn1; fc."""
    depth, width = parse_arch(arch)
    blocks_per_group = (depth - 4) // 6
    channels = [base_width, base_width * width, 2 * base_width * width, 4 * base_width * width]
    specs = []

    def conv(key, flax_module, out_ch, in_ch, k):
        specs.append(TensorSpec(f'{key}.weight', (out_ch, in_ch, k, k), 'params',
                                flax_module + ('kernel',), 'conv'))

    def bn(key, flax_module, ch):
        for torch_name, (collection, flax_name) in BN_TO_FLAX.items():
            specs.append(TensorSpec(f'{key}.{torch_name}', (ch,), collection,
                                    flax_module + (flax_name,), 'vector'))

    conv('conv1', ('conv1',), channels[0], 3, 3)
    for g in range(1, 4):
        for i in range(blocks_per_group):
            in_ch = channels[g - 1] if i == 0 else channels[g]
            out_ch = channels[g]
            key, module = f'block{g}.layer.{i}', (f'block{g}_layer_{i}',)
            bn(f'{key}.bn1', module + ('bn1',), in_ch)
            conv(f'{key}.conv1', module + ('conv1',), out_ch, in_ch, 3)
            bn(f'{key}.bn2', module + ('bn2',), out_ch)
            conv(f'{key}.conv2', module + ('conv2',), out_ch, out_ch, 3)
            if in_ch != out_ch:
                conv(f'{key}.convShortcut', module + ('convShortcut',), out_ch, in_ch, 1)
    bn('bn1', ('bn1',), channels[3])
    specs.append(TensorSpec('fc.weight', (num_classes, channels[3]), 'params', ('fc', 'kernel'),
                            'dense_kernel'))
    specs.append(TensorSpec('fc.bias', (num_classes,), 'params', ('fc', 'bias'), 'vector'))
    return specs


# Flax leaf name -> PyTorch parameter/buffer name, per collection.
FLAX_TO_TORCH = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                 ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                 ('batch_stats', 'var'): 'running_var'}


def flax_layout(arch: str, num_classes: int, width: Optional[int] = None) -> List[TensorSpec]:
    """The PyTorch state dict that ``registry.build(arch, num_classes, width)`` corresponds to,
    derived from the Flax model's variables, in the PyTorch modules' order.

    Each Flax module path is the PyTorch module path with '.' written '_'
    (``layer2_0/shortcut_0`` <-> ``layer2.0.shortcut.0``); leaves map by FLAX_TO_TORCH; a 4-D
    kernel is a conv (HWIO <-> OIHW), a 2-D one a linear layer ([in, out] <-> [out, in]). The
    modules come in the order the model creates them, which is the order of their PyTorch
    definitions; within a BatchNorm, weight, bias, running_mean, running_var. For the WRNs this
    gives exactly ``torch_layout`` (tests/test_toolbox_models.py checks it).
    """
    import jax
    import jax.numpy as jnp
    model = registry.build(arch, num_classes, width)
    leaves: List[Tuple[str, Tuple[str, ...], Tuple[int, ...]]] = []

    def walk(collection, tree, path):
        for name, value in tree.items():  # insertion order: the order of creation
            if isinstance(value, dict):
                walk(collection, value, path + (name,))
            else:
                leaves.append((collection, path + (name,), tuple(value.shape)))

    def init(key, x):
        variables = model.init(key, x)
        for collection in ('params', 'batch_stats'):
            walk(collection, dict(variables.get(collection, {})), ())
        return variables

    # Traced, not run: the walk sees the dicts as Flax builds them (eval_shape's own output
    # has its keys sorted).
    jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    modules: Dict[Tuple[str, ...], List[Tuple[str, Tuple[str, ...], Tuple[int, ...]]]] = {}
    for collection, path, shape in leaves:  # params first: each module's place is its params'
        modules.setdefault(path[:-1], []).append((collection, path, shape))
    specs = []
    for module, module_leaves in modules.items():
        prefix = '.'.join(part.replace('_', '.') for part in module)
        for collection, path, shape in module_leaves:
            torch_name = FLAX_TO_TORCH[(collection, path[-1])]
            if path[-1] == 'kernel' and len(shape) == 4:
                kind, torch_shape = 'conv', (shape[3], shape[2], shape[0], shape[1])
            elif path[-1] == 'kernel':
                kind, torch_shape = 'dense_kernel', (shape[1], shape[0])
            else:
                kind, torch_shape = 'vector', shape
            specs.append(TensorSpec(f'{prefix}.{torch_name}', torch_shape, collection, path,
                                    kind))
    return specs


# ----------------------------------------------------------------------------------------------
# Reading the file

def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError('Importing a PyTorch checkpoint needs PyTorch, which is not installed. '
                          f'Install it with:\n  {TORCH_INSTALL_HINT}') from None
    return torch


def load_torch_checkpoint(path: str, trust: bool = False) -> Dict[str, np.ndarray]:
    """The state dict in ``path`` as float32 NumPy arrays, keys without a ``module.`` prefix.

    ``torch.load(weights_only=True)`` refuses pickled objects other than tensors and plain
    containers; ``trust=True`` loads such files too (only for files from a source you trust).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f'No PyTorch checkpoint at {path!r}.')
    torch = _import_torch()
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=not trust)
    except Exception as error:  # torch raises UnpicklingError / RuntimeError for these
        if trust:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f'torch.load could not read {path!r} with weights_only=True ({reason}). '
                         'If the file holds more than tensors and plain containers and comes '
                         'from a source you trust, pass --trust_checkpoint to load it with full '
                         'unpickling.') from error
    return extract_state_dict(loaded, path)


def extract_state_dict(loaded: Any, path: str = '<checkpoint>') -> Dict[str, np.ndarray]:
    """{'state_dict': sd, ...} or a bare sd -> {key: float32 array}, ``module.`` prefixes off."""
    if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
        state_dict = loaded['state_dict']
    elif isinstance(loaded, dict) and loaded and all(hasattr(v, 'shape') for v in loaded.values()):
        state_dict = loaded
    else:
        keys = sorted(loaded)[:10] if isinstance(loaded, dict) else None
        raise ValueError(f'{path!r} holds neither a state dict nor a dict with a "state_dict" '
                         f'entry (found {type(loaded).__name__}'
                         + (f' with keys {keys}' if keys is not None else '') + ').')
    arrays = {}
    for key, value in state_dict.items():
        # nn.DataParallel / DistributedDataParallel save their wrapped model under 'module.'.
        key = key[len('module.'):] if key.startswith('module.') else key
        if hasattr(value, 'detach'):  # a torch.Tensor
            value = value.detach().cpu()
            value = value.float().numpy() if value.is_floating_point() else value.numpy()
        arrays[key] = np.array(value)  # a copy: Tensor.numpy() shares the tensor's memory
    return arrays


# ----------------------------------------------------------------------------------------------
# Conversion

def guess_arch(state_dict: Dict[str, np.ndarray]) -> Optional[str]:
    """The architecture a state dict most likely holds (for error messages), or None."""
    guess = _guess(state_dict)
    return guess[0] if guess else None


def _guess(state_dict: Dict[str, np.ndarray]) -> Optional[Tuple[str, int, int]]:
    """(name, width, the published width) of the architecture a state dict most likely holds: a
    WRN-depth-k (base width 16), or a toolbox ResNet or VGG at any width; or None."""
    try:
        if 'fc.weight' in state_dict:  # the authors' / toolbox's WideResNet
            layers = {int(m.group(1)) for k in state_dict
                      if (m := re.fullmatch(r'block1\.layer\.(\d+)\..*', k))}
            width = state_dict['fc.weight'].shape[1] // 64
            base = state_dict['conv1.weight'].shape[0]
            if not layers or base != 16:
                return None
            return f'WRN-{6 * (max(layers) + 1) + 4}-{width}', 16, 16
        if 'linear.weight' in state_dict:  # the toolbox's CIFAR ResNet
            from zskt_jax.models import resnet
            counts = tuple(1 + max((int(m.group(1)) for k in state_dict
                                    if (m := re.fullmatch(rf'layer{l}\.(\d+)\..*', k))),
                                   default=-1)
                           for l in range(1, 5))
            name = next((n for n, blocks in resnet.BLOCKS.items() if tuple(blocks) == counts),
                        None)
            return name and (name, state_dict['conv1.weight'].shape[0], resnet.DEFAULT_WIDTH)
        if 'classifier.weight' in state_dict:  # the toolbox's VGG
            from zskt_jax.models import vgg
            counts = tuple(sum(1 for k in state_dict if re.fullmatch(rf'block{b}\.\d+\.weight', k)
                               and np.ndim(state_dict[k]) == 4) for b in range(5))
            name = next((n for n, config in vgg.CONFIGS.items()
                         if tuple(len(block) for block in config) == counts), None)
            return name and (name, state_dict['block0.0.weight'].shape[0], vgg.DEFAULT_WIDTH)
        return None
    except (KeyError, IndexError, AttributeError, ValueError):
        return None


def _list(keys: Sequence[str], limit: int = 8) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def convert_state_dict(state_dict: Dict[str, np.ndarray], arch: str, num_classes: int,
                       base_width: Optional[int] = None) -> Dict[str, Any]:
    """A PyTorch state dict of ``arch`` (any registry name) -> our {'params', 'batch_stats'}
    (NumPy float32). ``base_width``: the stem/base width, None for the architecture's own (16
    for the WRNs, 64 for the ResNets and VGG).

    Raises StateDictMismatchError naming the first tensor whose shape differs from ``arch``'s
    (name, expected shape, found shape) and every missing or unexpected key.
    """
    architecture = registry.get(arch)
    arch = architecture.name
    base_width = architecture.default_width if base_width is None else base_width
    layout = flax_layout(arch, num_classes, base_width)
    expected_keys = {spec.torch_key for spec in layout}
    present = {k: v for k, v in state_dict.items() if not k.endswith(IGNORED_SUFFIXES)}
    missing = [spec.torch_key for spec in layout if spec.torch_key not in present]
    unexpected = [k for k in present if k not in expected_keys]
    first_mismatch = next(((spec, present[spec.torch_key].shape) for spec in layout
                           if spec.torch_key in present
                           and tuple(present[spec.torch_key].shape) != spec.torch_shape), None)
    if first_mismatch or missing or unexpected:
        problems = []
        if first_mismatch:
            spec, found = first_mismatch
            problems.append(f'first mismatching tensor {spec.torch_key}: expected shape '
                            f'{spec.torch_shape}, found {tuple(found)}')
        if missing:
            problems.append(f'missing keys: {_list(missing)}')
        if unexpected:
            problems.append(f'unexpected keys: {_list(unexpected)}')
        hint = ''
        if not any(spec.torch_key in present for spec in layout):
            hint += f" None of its keys is one of {arch}'s."
        guess = _guess(state_dict)
        if guess and guess[:2] != (arch, base_width):
            name, width, default = guess
            hint += (f' It looks like a {name}' + (f' of width {width}' if width != default else '')
                     + f': try --arch={name}' + (f' --width={width}' if width != default else '')
                     + '.')
        elif not guess:
            hint += f' It is none of {", ".join(registry.names())} at any width.'
        raise StateDictMismatchError(
            f'The checkpoint is not a {arch} with {num_classes} classes (base width {base_width}): '
            + '; '.join(problems) + '.' + hint)

    variables: Dict[str, Any] = {'params': {}, 'batch_stats': {}}
    for spec in layout:
        value = np.asarray(present[spec.torch_key], np.float32)
        if spec.kind == 'conv':
            value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif spec.kind == 'dense_kernel':
            value = value.T  # [out, in] -> [in, out]
        node = variables[spec.collection]
        for name in spec.flax_path[:-1]:
            node = node.setdefault(name, {})
        node[spec.flax_path[-1]] = np.ascontiguousarray(value)
    return variables


def check_against_model(variables, arch: str, num_classes: int, base_width: Optional[int],
                        image_shape) -> None:
    """The converted tree must be exactly what our model initialises (names and shapes)."""
    import jax
    import jax.numpy as jnp
    model = registry.build(arch, num_classes, base_width)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1,) + tuple(image_shape)))
    want = {jax.tree_util.keystr(p): tuple(l.shape)
            for p, l in jax.tree_util.tree_flatten_with_path(dict(abstract))[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(l))
            for p, l in jax.tree_util.tree_flatten_with_path(variables)[0]}
    if want != have:  # a bug in torch_layout, not in the user's file
        diff = sorted(set(want.items()) ^ set(have.items()))
        raise AssertionError(f'converted variables do not match {arch}: {diff[:10]}')


# ----------------------------------------------------------------------------------------------
# The command

def default_out(dataset: str, arch: str) -> str:
    """Where the zero-shot job looks for this teacher by default (common.teacher_dir)."""
    from zskt_jax import common
    return os.path.join(common.default_teacher_workdir(dataset, arch), 'teacher')


def evaluate_teacher(variables, arch: str, dataset: str, base_width: Optional[int] = None,
                     data_dir: Optional[str] = None, batch_size: int = 500) -> Optional[float]:
    """Test accuracy of the imported teacher, or None (with a log line) if the dataset is not
    prepared in ``data_dir``."""
    from zskt_jax import common, data, parallel
    info = data.dataset_info(dataset)
    try:
        images, labels = data.load_split(dataset, info.test_split, data_dir or None)
    except data.DatasetNotPreparedError as error:
        logger.warning('Not evaluated: %s', str(error).splitlines()[0])
        return None
    mesh = parallel.make_mesh()
    model = registry.build(arch, info.num_classes, base_width, axis_name=parallel.DATA_AXIS)
    evaluator = common.Evaluator(model, dataset, images, labels, batch_size, mesh)
    return evaluator(variables)


def import_teacher(checkpoint: str, arch: str, dataset: str, out: Optional[str] = None, *,
                   evaluate: bool = True, data_dir: Optional[str] = None, trust: bool = False,
                   base_width: Optional[int] = None) -> Tuple[str, Dict[str, Any]]:
    """Convert ``checkpoint`` and write it as a teacher directory; returns (out, meta).
    ``base_width``: the stem/base width, None for the architecture's own."""
    from zskt_jax import checkpoints, common, data
    info = data.dataset_info(dataset)
    architecture = registry.get(arch)
    arch = architecture.name  # 'wrn40_2' -> 'WRN-40-2', the name the zero-shot configs use
    base_width = architecture.default_width if base_width is None else base_width
    out = out or default_out(dataset, arch)
    state_dict = load_torch_checkpoint(checkpoint, trust=trust)
    try:
        variables = convert_state_dict(state_dict, arch, info.num_classes, base_width)
    except StateDictMismatchError as error:
        raise StateDictMismatchError(f'{checkpoint}: {error}') from None
    check_against_model(variables, arch, info.num_classes, base_width, info.image_shape)
    meta = common.teacher_record(arch, dataset, base_width,
                                 source=f'pytorch:{os.path.abspath(checkpoint)}')
    if evaluate:
        accuracy = evaluate_teacher(variables, arch, dataset, base_width, data_dir)
        if accuracy is not None:
            meta['test_accuracy'] = accuracy
            logger.info('Imported %s test accuracy on %s: %.2f%%', arch, dataset, 100 * accuracy)
    checkpoints.save_teacher(out, variables, meta)
    logger.info('Teacher written to %s', paths.absolute(out))
    return out, meta


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='python -m zskt_jax.import_torch',
        description="Convert a PyTorch teacher (the ZSKT authors' WideResNets, the zju-vipa/CMI "
                    "toolbox's resnet18 / resnet34 / vgg11 / wrn*) into a teacher directory for "
                    'run.py. Needs: ' + TORCH_INSTALL_HINT)
    parser.add_argument('--checkpoint', required=True,
                        help="the authors' last.pth.tar, a toolbox checkpoint, or any torch.save "
                             "of such a state dict, bare or under 'state_dict', with or without "
                             "'module.'")
    parser.add_argument('--arch', required=True,
                        help="its architecture: 'WRN-40-2' or a toolbox name (" +
                             ', '.join(registry.TOOLBOX_NAMES) + ')')
    parser.add_argument('--width', type=int, default=None,
                        help='its stem/base width; default the published networks\' (16 for '
                             'the WRNs, 64 for the ResNets and VGG)')
    parser.add_argument('--dataset', required=True,
                        help='the dataset the teacher was trained on: svhn | cifar10 | cifar100 '
                             '(its number of classes; the split the optional evaluation uses)')
    parser.add_argument('--out', default=None,
                        help='teacher directory to write; default runs/teacher_{dataset}_{arch}/'
                             'teacher, where the zero-shot job looks by default')
    parser.add_argument('--data_dir', default=None,
                        help="TFDS data dir for the optional evaluation; default TFDS's own")
    parser.add_argument('--no_eval', action='store_true',
                        help='do not measure test accuracy (it is skipped anyway, with a note, '
                             'when the dataset is not prepared)')
    parser.add_argument('--trust_checkpoint', action='store_true',
                        help='allow full unpickling (torch.load weights_only=False) for files '
                             'that hold more than tensors; only for files you trust')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from zskt_jax import data
    data.quiet_tensorflow()
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        out, meta = import_teacher(args.checkpoint, args.arch, args.dataset, args.out,
                                   evaluate=not args.no_eval, data_dir=args.data_dir,
                                   trust=args.trust_checkpoint, base_width=args.width)
    except (ImportError, FileNotFoundError, ValueError) as error:
        # ValueError includes ConfigError (an unknown --arch or --dataset) and
        # StateDictMismatchError. A person's error: its message, no traceback.
        print(f'error: {error}', file=sys.stderr)
        return 1
    accuracy = meta.get('test_accuracy')
    print(f'{meta["arch"]} teacher for {args.dataset} written to {out}'
          + (f' (test accuracy {100 * accuracy:.2f}%)' if accuracy is not None else ''))
    return 0


if __name__ == '__main__':
    # main() returns 1 for a person's error (its callers and tests rely on it); the command exits
    # with the launchers' status for those, errors.EXIT_STATUS (2).
    sys.exit(errors.EXIT_STATUS if main() else 0)
