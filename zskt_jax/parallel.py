"""The device mesh and data-parallel helpers (pmap-style code via jax.jit(jax.shard_map(...))).

One 1-D mesh named ``data`` over every device of every process. States are replicated (``P()``),
batches are split along their leading axis (``P('data')``). With several processes (a TPU pod
slice, several GPU hosts) every process runs the same program; each holds only its own rows of a
batch and hands them to JAX with ``jax.make_array_from_process_local_data``, which assembles the
global array without moving data between hosts.
"""
import math
from typing import Callable, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zskt_jax.errors import ConfigError
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh):
    return NamedSharding(mesh, P())


def batch_sharded(mesh):
    return NamedSharding(mesh, P(DATA_AXIS))


def mesh_process_count(mesh) -> int:
    """How many processes own devices of ``mesh`` (``jax.process_count()`` for the default mesh)."""
    return len({d.process_index for d in mesh.devices.flat})


def _replicate_leaf(x, sharding):
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Typed PRNG keys have no NumPy form: replicate their raw data and wrap it again.
        data = _replicate_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    # Every process holds the same value (same seed, same file): each fills its own devices from
    # its own copy, with no cross-host transfer and no equality check (``jax.device_put`` of a
    # host value onto a multi-process sharding runs one collective per leaf to check it).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh):
    """Place a host pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def check_divisible(batch_size: int, mesh, what: str = 'batch_size'):
    """A global batch must split evenly over the devices (and hence over the processes)."""
    devices = mesh.devices.size
    if batch_size % devices:
        raise ConfigError(f'config.{what} = {batch_size} does not divide evenly across the '
                         f'{devices} devices of the mesh; choose a multiple of {devices}')


def process_rows(global_batch_size: int, mesh) -> np.ndarray:
    """The rows of a ``P('data')``-sharded global batch that this process's devices hold, in
    increasing order: the indices into the global batch of the host-local batch it must feed.

    With the default mesh these are one contiguous block (``process_index * per_host + ...``);
    they are read from the sharding so that any device order of the mesh is right.
    """
    check_divisible(global_batch_size, mesh)
    index_map = batch_sharded(mesh).addressable_devices_indices_map((global_batch_size,))
    blocks = sorted({index[0].indices(global_batch_size)[:2] for index in index_map.values()})
    return np.concatenate([np.arange(start, stop) for start, stop in blocks])


def global_batch(tree, mesh, global_batch_size: int):
    """Host-local batch rows (a pytree of NumPy arrays whose leading axis is this process's share:
    ``process_rows``, or any per-host data of that size) -> global arrays sharded over ``data``."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
        sharding, np.asarray(x), (global_batch_size,) + np.shape(x)[1:]), tree)


def shard_batch(tree, mesh):
    """A whole global batch, the same on every process (a pytree of NumPy arrays) -> global
    arrays sharded over ``data``; each process feeds only its ``process_rows``."""
    size = len(jax.tree.leaves(tree)[0])
    rows = process_rows(size, mesh)
    return global_batch(jax.tree.map(lambda x: np.asarray(x)[rows], tree), mesh, size)


def data_parallel(per_device: Callable, mesh, in_specs, out_specs):
    """shard_map over the ``data`` axis: ``per_device`` sees its slice and may use collectives."""
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def make_counts_fn(apply_fn: Callable, preprocess: Callable, mesh):
    """Compiled (variables, images, labels, mask) -> per-class counts, summed over devices:
    (correct [C], examples [C], predicted [C]) as int32, C the number of logits.

    ``mask`` marks real examples, so padding added to make a batch divisible never counts.
    """
    def per_device(variables, images, labels, mask):
        logits, _ = apply_fn(variables, preprocess(images), train=False)
        predictions = jnp.argmax(logits, -1)
        num_classes = logits.shape[-1]
        per_class = lambda classes, where: jnp.sum(
            jax.nn.one_hot(classes, num_classes, dtype=jnp.int32) * where[:, None], axis=0)
        counts = (per_class(labels, mask & (predictions == labels)), per_class(labels, mask),
                  per_class(predictions, mask))
        return jax.lax.psum(counts, DATA_AXIS)

    batch = P(DATA_AXIS)
    return jax.jit(data_parallel(per_device, mesh, (P(), batch, batch, batch), P()))


def pad_batch(images: np.ndarray, labels: np.ndarray, size: int):
    """Pad a final partial batch to ``size`` examples; returns (images, labels, mask)."""
    n = len(labels)
    mask = np.zeros(size, bool)
    mask[:n] = True
    if n < size:
        images = np.concatenate([images, np.zeros((size - n,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(size - n, labels.dtype)])
    return images, labels, mask


def eval_batch_sizes(batch_size: int, mesh):
    """(per-process, global) evaluation batch sizes: ``batch_size`` rounded UP so that every
    device gets the same number of rows; the padding rows are masked, never counted."""
    processes = mesh_process_count(mesh)
    local_devices = mesh.devices.size // processes
    per_process = math.ceil(math.ceil(batch_size / processes) / local_devices) * local_devices
    return per_process, per_process * processes


def num_eval_batches(num_local_examples: int, batch_size: int, mesh) -> int:
    """Batches every process must run: the most any process needs for its share. Collectives
    need every process in every step, so a process with a smaller share runs masked batches."""
    per_process, _ = eval_batch_sizes(batch_size, mesh)
    local = math.ceil(num_local_examples / per_process)
    if mesh_process_count(mesh) == 1:
        return local
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(local))))


class ClassCounts(NamedTuple):
    """Evaluation counts per class over a whole split (numpy int64 arrays [num_classes])."""
    correct: np.ndarray     # examples of the class predicted correctly
    examples: np.ndarray    # examples of the class
    predicted: np.ndarray   # examples (of any class) predicted as the class

    @property
    def accuracy(self) -> float:
        return int(self.correct.sum()) / int(self.examples.sum())

    def recall(self) -> List[Optional[float]]:
        """Per-class accuracy; None for a class with no examples in the split."""
        return [int(c) / int(n) if n else None for c, n in zip(self.correct, self.examples)]

    def never_predicted(self) -> List[int]:
        """Classes present in the split that no example was predicted as: the stalled-student
        symptom (the generator never made the student learn them)."""
        return [k for k, (n, p) in enumerate(zip(self.examples, self.predicted)) if n and not p]


def evaluate_counts(counts_fn, variables, images: np.ndarray, labels: np.ndarray,
                    batch_size: int, mesh, num_batches: int = None) -> ClassCounts:
    """Per-class counts over a split of which this process holds ``images``/``labels`` (all of
    it in a single-process run; its ``data.shard_indices`` share with several processes).

    Exact whatever the device and process counts: predictions and real examples are counted on
    every device as integers and summed; padding is masked out. ``num_batches``: from
    ``num_eval_batches`` (computed here if not given; with several processes that is a
    collective, so every process must call this together).
    """
    per_process, global_size = eval_batch_sizes(batch_size, mesh)
    if num_batches is None:
        num_batches = num_eval_batches(len(labels), batch_size, mesh)
    totals = None
    for b in range(num_batches):
        start = b * per_process
        batch = pad_batch(images[start:start + per_process], labels[start:start + per_process],
                          per_process)
        batch_counts = [np.asarray(c, np.int64) for c in
                        counts_fn(variables, *global_batch(batch, mesh, global_size))]
        totals = batch_counts if totals is None else [t + c for t, c in zip(totals, batch_counts)]
    counts = ClassCounts(*totals) if totals else None
    if counts is None or counts.examples.sum() == 0:
        raise ValueError('evaluate_counts: the evaluation split is empty')
    return counts
