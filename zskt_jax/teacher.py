"""Teacher training from scratch (docs/method.md, section "Teachers"): SGD with momentum and
weight decay, lr divided by 5 at 30%, 60% and 80% of the run, optional crop/flip augmentation done
on device.

Writes ``{workdir}/teacher`` (variables + teacher.json), the directory the zero-shot job loads.
"""
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zskt_jax import checkpoints, common, data, loop, losses, parallel, paths, reporting
from zskt_jax.errors import ConfigError
from zskt_jax.parallel import DATA_AXIS
from zskt_jax.state import create_state, sgd

logger = reporting.logger

def step_learning_rate(base_lr: float, epoch, total_epochs: int, milestones, decay: float):
    """lr = base * decay^(number of milestones passed); milestones are fractions of the run."""
    passed = sum((epoch >= int(round(m * total_epochs))).astype(jnp.int32) for m in milestones)
    return base_lr * decay ** passed.astype(jnp.float32)


def augment(key, images, mode: str):
    """uint8 [B, H, W, C] -> augmented uint8 batch. 'crop': random HxW crop of the image padded
    by H/8 zero pixels (at 32x32: torchvision RandomCrop(32, padding=4); 2 pixels at 16x16);
    'crop_flip': plus horizontal flip."""
    if mode == 'none':
        return images
    if mode not in ('crop', 'crop_flip'):
        raise ConfigError(f"augment = {mode!r}; choose 'none', 'crop' or 'crop_flip'")
    b, h, w, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    pad = h // 8
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
        padded, offsets)
    if mode == 'crop_flip':
        flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
        images = jnp.where(flip, images[:, :, ::-1], images)
    return images


def make_train_step(model, config, steps_per_epoch: int, mesh):
    """Compiled SGD step: (state, images uint8, labels, key) -> (state, metrics), data parallel."""
    def per_device(state, images, labels, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        images = augment(key, images, config.augment)
        x = data.normalize(images, config.dataset)
        epoch = state.step // steps_per_epoch
        lr = step_learning_rate(config.learning_rate, epoch, config.epochs, config.lr_milestones,
                                config.lr_decay)

        def loss_fn(params):
            (logits, _), updated = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                               x, train=True, mutable=['batch_stats'])
            loss = jax.lax.pmean(losses.cross_entropy(logits, labels), DATA_AXIS)
            return loss, (updated['batch_stats'], logits)

        (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, lr, stats).replace(step=state.step + 1)
        accuracy = jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), DATA_AXIS)
        return state, {'loss': loss, 'train_accuracy': accuracy, 'learning_rate': lr}

    batch = P(DATA_AXIS)
    return jax.jit(parallel.data_parallel(per_device, mesh, (P(), batch, batch, P()), (P(), P())))


class EpochBatches:
    """Step i's example indices and augmentation key: epoch e = i // steps_per_epoch draws a
    permutation from fold_in(key, e) and its step j takes the j-th batch of it (the last partial
    batch dropped) with the key fold_in(epoch key, j); a function of (key, i) only, so a run
    stopped mid-epoch resumes exactly. The current epoch's permutation is kept."""

    def __init__(self, n: int, batch_size: int, key):
        self.n, self.batch_size, self.key = n, batch_size, key
        self.steps_per_epoch = n // batch_size
        self._epoch, self._permutation = None, None

    def __call__(self, i: int):
        epoch, j = divmod(i, self.steps_per_epoch)
        epoch_key = jax.random.fold_in(self.key, epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.asarray(jax.random.permutation(epoch_key, self.n))
        idx = self._permutation[j * self.batch_size:(j + 1) * self.batch_size]
        return idx, jax.random.fold_in(epoch_key, j)


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Train a teacher from scratch; writes it to ``config.teacher.checkpoint`` (default
    ``{workdir}/teacher``) and returns the results written to ``{workdir}/results.json``."""
    info = data.dataset_info(config.dataset)
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.batch_size, mesh)

    # Every process holds the whole training split (it draws the same permutation and feeds its
    # rows of each global batch) but only its share of the test split.
    train_images, train_labels = common.load_split(config, info.train_split)
    test_images, test_labels = common.load_eval_split(config)
    steps_per_epoch = len(train_labels) // config.batch_size  # the last partial batch is dropped
    if steps_per_epoch == 0:
        raise ConfigError(f'config.batch_size = {config.batch_size} exceeds the '
                          f'{len(train_labels)} training examples of {config.dataset}')
    model = common.build_network(config.teacher, info.num_classes, config)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    tx = sgd(config.momentum, config.weight_decay, config.nesterov)
    state = create_state(model, init_key, jnp.zeros((2,) + info.image_shape), tx)
    state = parallel.replicate(state, mesh)

    # Checkpoints are labelled by optimizer step; a stop mid-epoch resumes exactly (EpochBatches).
    run = loop.RunDir(workdir, config, unit='step')
    start, saved, _ = run.restore(state.state_dict())
    state = state if saved is None else state.replace_from(saved)

    train_step = make_train_step(model, config, steps_per_epoch, mesh)
    total_steps = config.epochs * steps_per_epoch
    progress = reporting.Progress(start, total_steps, steps_per_unit=steps_per_epoch,
                                  unit='epoch')
    batches = EpochBatches(len(train_labels), config.batch_size, data_key)

    def step(state, i):
        idx, augment_key = batches(i)
        images, labels = parallel.shard_batch((train_images[idx], train_labels[idx]), mesh)
        return train_step(state, images, labels, augment_key)

    def log(done, metrics):  # at the end of every epoch
        epoch = done // steps_per_epoch
        run.writer.write_scalars(epoch, {f'train/{k}': v for k, v in metrics.items()})
        if epoch % config.log_every_epochs == 0 or done == total_steps:
            logger.info(progress.line(done, metrics))

    end = loop.train_loop(
        step, state, start, total_steps,
        loop.Cadence(steps_per_epoch, 0, config.checkpoint_every_epochs * steps_per_epoch,
                     config.stop_after_steps),
        run=run, state_dict=lambda state: state.state_dict(), read_metrics=loop.read_scalars,
        log=log, evaluate=lambda done, state: None, progress=progress)
    if end.stopped_at is not None:
        return run.stopped('teacher', end.stopped_at)

    variables = {'params': end.state.params, 'batch_stats': end.state.batch_stats}
    accuracy = common.Evaluator(model, config.dataset, test_images, test_labels,
                                config.eval_batch_size, mesh)(variables)
    run.writer.write_scalars(config.epochs, {'eval/teacher_accuracy': accuracy})
    logger.info('Teacher %s test accuracy on %s: %.2f%%', config.teacher.arch, config.dataset,
                100 * accuracy)
    teacher_path = config.teacher.checkpoint or os.path.join(workdir, 'teacher')
    checkpoints.save_teacher(teacher_path, variables, common.teacher_record(
        config.teacher.arch, config.dataset, common.network_width(config.teacher),
        test_accuracy=accuracy, source='trained', epochs=config.epochs))
    results = {'job': 'teacher', 'teacher_accuracy': accuracy,
               'teacher_path': paths.absolute(teacher_path)}
    run.finish(results)
    logger.info('Teacher written to %s', teacher_path)
    return results
