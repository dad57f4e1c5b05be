"""The device mesh and data-parallel helpers (pmap-style code via jax.jit(jax.shard_map(...))).

One 1-D mesh named ``data`` over every device of every process. States are replicated (``P()``),
batches are split along their leading axis (``P('data')``).
"""
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
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


def replicate(tree, mesh):
    """Place a host pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx])
        if jax.process_count() > 1 else jax.device_put(x, sharding), tree)


def check_divisible(batch_size: int, mesh, what: str = 'batch_size'):
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f'config.{what} = {batch_size} does not divide evenly across the '
                         f'{devices} devices of the mesh; choose a multiple of {devices}')


def data_parallel(per_device: Callable, mesh, in_specs, out_specs):
    """shard_map over the ``data`` axis: ``per_device`` sees its slice and may use collectives."""
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def make_accuracy_fn(apply_fn: Callable, preprocess: Callable, mesh):
    """Compiled (variables, images, labels, mask) -> (correct, counted), summed over devices.

    ``mask`` marks real examples, so padding added to make a batch divisible never counts.
    """
    def per_device(variables, images, labels, mask):
        logits, _ = apply_fn(variables, preprocess(images), train=False)
        hits = (jnp.argmax(logits, -1) == labels) & mask
        return (jax.lax.psum(jnp.sum(hits, dtype=jnp.int32), DATA_AXIS),
                jax.lax.psum(jnp.sum(mask, dtype=jnp.int32), DATA_AXIS))

    batch = P(DATA_AXIS)
    return jax.jit(data_parallel(per_device, mesh, (P(), batch, batch, batch), (P(), P())))


def pad_batch(images: np.ndarray, labels: np.ndarray, size: int):
    """Pad a final partial batch to ``size`` examples; returns (images, labels, mask)."""
    n = len(labels)
    mask = np.zeros(size, bool)
    mask[:n] = True
    if n < size:
        images = np.concatenate([images, np.zeros((size - n,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([labels, np.zeros(size - n, labels.dtype)])
    return images, labels, mask


def evaluate_accuracy(accuracy_fn, variables, images: np.ndarray, labels: np.ndarray,
                      batch_size: int, mesh) -> float:
    """Top-1 accuracy over a whole split held in host memory (single process)."""
    devices = mesh.devices.size
    batch_size = int(math.ceil(batch_size / devices) * devices)
    correct = counted = 0
    sharding = batch_sharded(mesh)
    for start in range(0, len(labels), batch_size):
        batch = pad_batch(images[start:start + batch_size], labels[start:start + batch_size],
                          batch_size)
        c, n = accuracy_fn(variables, *(jax.device_put(a, sharding) for a in batch))
        correct += int(c)
        counted += int(n)
    return correct / counted
