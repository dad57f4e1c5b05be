"""Pieces every job shares: building the networks from the config, finding the teacher,
evaluation data and the accuracy function, and a distillation's config resolved once
(``resolve_distillation``)."""
import dataclasses
import functools
import logging
import os
from typing import Any, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from zskt_jax import checkpoints, data, parallel, paths
from zskt_jax.errors import ConfigError
from zskt_jax.models import Generator, registry
from zskt_jax.models.layers import CONVOLUTIONS
from zskt_jax.parallel import DATA_AXIS

logger = logging.getLogger('zskt_jax')

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config):
    name = config.compute_dtype
    if name not in DTYPES:
        raise ConfigError(f'config.compute_dtype = {name!r}; choose one of {sorted(DTYPES)}')
    return DTYPES[name]


def weight_grad_chunk(config) -> int:
    """config.weight_grad_chunk resolved for this machine: examples per slice of each conv kernel
    gradient (``models.layers.chunked_weight_grad_conv``); 0 = the whole batch at once (the
    default). The slices are a lever for XLA's CPU convolutions: 0 under oneDNN's (whose kernel
    gradients take the whole batch; ``models.layers.conv_function``), and on a GPU or TPU, where
    they only cost time, saying so once."""
    chunk = config.get('weight_grad_chunk', 0)  # belief's configs have none: no weight gradients
    if chunk < 0:
        raise ConfigError(f'config.weight_grad_chunk = {chunk}; use 0 (off) or a positive '
                         'number of examples per slice (8 is fastest on XLA:CPU)')
    if chunk and convolution(config) == 'onednn':
        return 0
    backend = jax.default_backend()
    if chunk and backend != 'cpu':
        _log_once(logging.INFO, f'config.weight_grad_chunk = {chunk} is a CPU lever; on {backend} '
                  'each kernel gradient takes the whole batch at once (faster there)')
        return 0
    return chunk


def convolution(config) -> str:
    """config.convolution resolved for this machine: 'onednn' (``zskt_jax.onednn``: oneDNN's
    convolutions, a CPU speed mode) where it runs here, else 'xla' (XLA's own; the paper configs'),
    saying once why oneDNN's are not used."""
    name = config.get('convolution', 'xla')  # belief's configs have none
    if name not in CONVOLUTIONS:
        raise ConfigError(f'config.convolution = {name!r}; choose one of {list(CONVOLUTIONS)}')
    if name == 'onednn':
        from zskt_jax import onednn
        ok, line = onednn.usable()
        # On a GPU or TPU XLA's convolutions are the fast ones: no warning there.
        level = logging.INFO if ok or jax.default_backend() != 'cpu' else logging.WARNING
        _log_once(level, line if ok else
                  f'config.convolution = onednn: {line}; using XLA\'s convolutions')
        if not ok:
            return 'xla'
    return name


@functools.lru_cache(maxsize=None)
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)


def network_width(net_config) -> int:
    """The stem width of a ``config.teacher`` / ``config.student`` section: its ``base_width``,
    or the architecture's own (16 for WRNs, 64 for the ResNets and VGG) where that is 0."""
    return net_config.base_width or registry.get(net_config.arch).default_width


def network_arch(net_config) -> str:
    """The section's architecture under the name teachers are stored by ('wrn40_2' ->
    'WRN-40-2')."""
    return registry.canonical_name(net_config.arch)


def build_network(net_config, num_classes: int, config, axis_name=DATA_AXIS):
    """The network of a ``config.teacher`` / ``config.student`` section, by name from the model
    registry (``zskt_jax.models.registry``), every BatchNorm averaging over ``axis_name`` (the
    ``data`` axis of the jobs' shard_map; None outside one)."""
    return registry.build(net_config.arch, num_classes, width=network_width(net_config),
                          axis_name=axis_name, dtype=compute_dtype(config),
                          weight_grad_chunk=weight_grad_chunk(config),
                          convolution=convolution(config))


def attention_pairs(config) -> Tuple[Tuple[int, int], ...]:
    """Which stage outputs attention transfer compares, as (teacher stage, student stage) indices:
    each student stage with the last teacher stage of the same spatial size (every WRN pair: its
    three groups in order; ResNet-34 -> ResNet-18: all four layers). A pair with no stages of equal
    size and ``beta > 0`` is a config error."""
    size = data.dataset_info(config.dataset).image_shape[0]
    teacher = registry.stages(config.teacher.arch, size, network_width(config.teacher))
    student = registry.stages(config.student.arch, size, network_width(config.student))
    pairs = []
    for j, stage in enumerate(student):
        same_size = [i for i, t in enumerate(teacher) if t.size == stage.size]
        if same_size:
            pairs.append((same_size[-1], j))
    if config.beta > 0 and not pairs:
        def sizes(stages):
            return ', '.join(f'{s.name} {s.size}x{s.size}' for s in stages) or 'none declared'
        raise ConfigError(
            f'config.beta = {config.beta}: attention transfer needs teacher and student stages of '
            f'equal spatial size, and {config.teacher.arch} -> {config.student.arch} at '
            f'{size}x{size} has none (teacher: {sizes(teacher)}; student: {sizes(student)}). '
            'Set --config.beta=0 to distil without attention transfer.')
    return tuple(pairs)


def build_generator(config):
    image_size = data.dataset_info(config.dataset).image_shape[0]
    if image_size % 4:
        raise ConfigError(f'the generator upsamples x4; image size {image_size} is not a multiple of 4')
    return Generator(init_size=image_size // 4, hidden=config.generator.hidden,
                     axis_name=DATA_AXIS, dtype=compute_dtype(config),
                     weight_grad_chunk=weight_grad_chunk(config), convolution=convolution(config))


def teacher_dir(config) -> str:
    """Where this config's teacher lives: ``config.teacher.checkpoint`` or the teacher job's
    default output, ``runs/teacher_{dataset}_{arch}/teacher``."""
    if config.teacher.checkpoint:
        return config.teacher.checkpoint
    return os.path.join(default_teacher_workdir(config.dataset, network_arch(config.teacher)),
                        'teacher')


def default_teacher_workdir(dataset: str, arch: str) -> str:
    return os.path.join('runs', f'teacher_{dataset}_{arch}')


def teacher_record(arch: str, dataset: str, base_width: int = 0, **fields) -> Dict[str, Any]:
    """The record a teacher is saved with and checked against (``checkpoints.check_teacher``):
    a network of the registry (``arch`` under its canonical name, its ``base_width``: 0 for the
    architecture's own) for ``dataset``'s classes and image size, plus ``fields`` (source,
    accuracy, ...)."""
    info = data.dataset_info(dataset)
    return {'arch': registry.canonical_name(arch),
            'base_width': base_width or registry.get(arch).default_width,
            'num_classes': info.num_classes, 'image_shape': list(info.image_shape),
            'dataset': dataset, **fields}


def write_teacher(path: str, variables, arch: str, dataset: str, base_width: int = 0,
                  source: str = 'own') -> str:
    """Save a teacher's variables (``params``, ``batch_stats``) where a distillation loads it
    from (``--config.teacher.checkpoint=path``), with its ``teacher_record``
    (docs/own_teacher.md)."""
    checkpoints.save_teacher(path, variables,
                             teacher_record(arch, dataset, base_width, source=source))
    return path


def load_teacher_for(config) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The teacher's variables and record, checked against the config and dataset."""
    path = teacher_dir(config)
    info = data.dataset_info(config.dataset)
    # The teacher recipe of this config (the digits configs name theirs), else the dataset's.
    recipe = config.teacher.get('recipe', '') or f'configs/teacher_{config.dataset}.py'
    hint = (f'python run.py --config={recipe} --config.dataset={config.dataset} '
            f'--config.teacher.arch={config.teacher.arch} '
            f'--config.teacher.base_width={network_width(config.teacher)} '
            f'--workdir={os.path.dirname(paths.absolute(path))}\n'
            f'or import a published PyTorch teacher (the authors\' or the zju-vipa/CMI '
            f'toolbox\'s):\n  python -m zskt_jax.import_torch '
            f'--checkpoint=FILE.pth --arch={config.teacher.arch} '
            f'--dataset={config.dataset} --out={paths.absolute(path)}\n'
            'or point --config.teacher.checkpoint at an existing teacher directory.')
    variables, meta = checkpoints.load_teacher(path, make_hint=hint)
    checkpoints.check_teacher(meta, num_classes=info.num_classes, image_shape=info.image_shape,
                              teacher_arch=network_arch(config.teacher),
                              teacher_base_width=network_width(config.teacher), path=path)
    return variables, meta


def load_split(config, split: str):
    """A whole split, identical on every process (e.g. training data, from which every process
    takes its rows of each global batch)."""
    return data.load_split(config.dataset, split, config.data_dir or None)


def load_eval_split(config, split: str = None):
    """This process's share of an evaluation split (default: the test split): all of it in a
    single-process run; with several processes the contiguous ``data.shard_indices`` slice, read
    alone (a TFDS slice), so that no host reads the whole split. ``Evaluator`` combines the
    shares exactly."""
    split = split or data.dataset_info(config.dataset).test_split
    process_count, process_index = jax.process_count(), jax.process_index()
    if process_count == 1:
        return load_split(config, split)
    if not split.isidentifier():
        # Already a TFDS slice ('test[:1000]'): read it, then keep this process's share.
        images, labels = load_split(config, split)
        share = data.shard_indices(len(labels), process_index, process_count)
        return images[share], labels[share]
    share = data.shard_indices(_split_size(config, split), process_index, process_count)
    return load_split(config, f'{split}[{share.start}:{share.stop}]')


def _split_size(config, split: str) -> int:
    import tensorflow_datasets as tfds
    spec = data.dataset_info(config.dataset)
    builder = tfds.builder(spec.tfds_name, data_dir=config.data_dir or None)
    if not builder.is_prepared():
        load_split(config, split)  # prepares, or explains
        builder = tfds.builder(spec.tfds_name, data_dir=config.data_dir or None)
    if split not in builder.info.splits:
        load_split(config, split)  # names the known splits
    return builder.info.splits[split].num_examples


class Evaluator:
    """Top-1 accuracy (and per-class counts) of a WideResNet (inference-mode BN) on a split held
    in host memory.

    ``images``/``labels``: this process's share (``load_eval_split``). With several processes
    every process must construct and call the Evaluator together (the evaluation is a collective
    computation); the results are the same exact values on all of them.
    """

    def __init__(self, model, dataset: str, images: np.ndarray, labels: np.ndarray,
                 batch_size: int, mesh):
        self.images, self.labels, self.batch_size, self.mesh = images, labels, batch_size, mesh
        preprocess = lambda x: data.normalize(x, dataset)
        self.counts_fn = parallel.make_counts_fn(model.apply, preprocess, mesh)
        self.num_batches = parallel.num_eval_batches(len(labels), batch_size, mesh)

    def counts(self, variables) -> parallel.ClassCounts:
        return parallel.evaluate_counts(self.counts_fn, variables, self.images, self.labels,
                                        self.batch_size, self.mesh, self.num_batches)

    def __call__(self, variables) -> float:
        return self.counts(variables).accuracy


def teacher_accuracy(config, model, variables, eval_images, eval_labels, mesh) -> float:
    """The teacher's test accuracy, logged (every distillation reports it beside the student's)."""
    accuracy = Evaluator(model, config.dataset, eval_images, eval_labels,
                         config.eval_batch_size, mesh)(variables)
    logger.info('Teacher %s test accuracy: %.2f%%', config.teacher.arch, 100 * accuracy)
    return accuracy


class Models(NamedTuple):
    """The three networks as built for training (BatchNorms averaging over the ``data`` axis);
    ``generator`` is None in a job that has none (few-shot)."""
    generator: Any
    student: Any
    teacher: Any


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A distillation job's config resolved once into what the run needs: the jobs and their
    builders read these fields instead of deriving them from the config again."""
    info: data.DatasetSpec
    mesh: Any
    models: Models
    teacher_variables: Any                      # replicated on ``mesh``
    teacher_meta: Dict[str, Any]                # the teacher's record (checksum, ...)
    teacher_path: str                           # absolute
    eval_split: Tuple[np.ndarray, np.ndarray]   # this process's share (``load_eval_split``)

    def teacher_accuracy(self, config) -> float:
        return teacher_accuracy(config, self.models.teacher, self.teacher_variables,
                                *self.eval_split, self.mesh)


def _check_teacher_batchnorms(config, teacher_variables, info) -> None:
    """BN-statistics matching reads the input moments that the project's BatchNorm
    (``models.layers.BatchNorm``) records; a teacher without any would add a silent 0. (Traced
    for shapes only, with BatchNorms that average over no mesh axis.)"""
    from zskt_jax.models.layers import INPUT_MOMENTS
    teacher = build_network(config.teacher, info.num_classes, config, axis_name=None)
    x = jax.ShapeDtypeStruct((2,) + tuple(info.image_shape), jnp.float32)
    _, sown = jax.eval_shape(lambda v, x: teacher.apply(v, x, train=False,
                                                        mutable=[INPUT_MOMENTS]),
                             teacher_variables, x)
    if not jax.tree.leaves(sown.get(INPUT_MOMENTS, {})):
        raise ConfigError(
            f'config.bn_weight = {config.bn_weight}: the BatchNorm-statistics term needs a '
            f'teacher whose BatchNorms record their input moments (zskt_jax.models.layers.'
            f'BatchNorm), and {config.teacher.arch} has none. Set --config.bn_weight=0, or build '
            'the teacher with that BatchNorm (docs/own_teacher.md).')


def resolve_distillation(config, with_generator: bool = True) -> Distillation:
    """What every distillation starts from, with the batch checked against the mesh: the
    networks, the teacher loaded, checked and replicated, and the evaluation split."""
    info = data.dataset_info(config.dataset)
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.batch_size, mesh)
    teacher_variables, teacher_meta = load_teacher_for(config)
    models = Models(generator=build_generator(config) if with_generator else None,
                    student=build_network(config.student, info.num_classes, config),
                    teacher=build_network(config.teacher, info.num_classes, config))
    if config.get('bn_weight', 0) > 0:
        _check_teacher_batchnorms(config, teacher_variables, info)
    return Distillation(info=info, mesh=mesh, models=models,
                        teacher_variables=parallel.replicate(teacher_variables, mesh),
                        teacher_meta=teacher_meta,
                        teacher_path=paths.absolute(teacher_dir(config)),
                        eval_split=load_eval_split(config))
