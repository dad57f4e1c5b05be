"""Teacher training from scratch (REFERENCE.md, "Teachers"): SGD with momentum and weight decay,
lr divided by 5 at 30%, 60% and 80% of the run, optional crop/flip augmentation done on device.

Writes ``{workdir}/teacher`` (variables + teacher.json), the directory the zero-shot job loads.
"""
import os
import time
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zskt_jax import checkpoints, common, data, losses, parallel, reporting
from zskt_jax.errors import ConfigError, NonFiniteLossError
from zskt_jax.parallel import DATA_AXIS
from zskt_jax.preemption import PreemptionGuard
from zskt_jax.state import create_state, sgd

logger = reporting.logger

# Fields that must agree between a teacher checkpoint and the run resuming from it.
TEACHER_RESUME_FIELDS = ('dataset', 'teacher.arch', 'teacher.base_width', 'epochs', 'batch_size',
                         'learning_rate', 'momentum', 'nesterov', 'weight_decay', 'lr_milestones',
                         'lr_decay', 'seed', 'augment', 'compute_dtype')


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


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    start_time = time.time()
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
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
    tx = sgd(config.momentum, config.weight_decay, config.get('nesterov', False))
    state = create_state(model, init_key, jnp.zeros((2,) + info.image_shape), tx)
    state = parallel.replicate(state, mesh)

    run_checkpoints = checkpoints.RunCheckpoints(os.path.join(workdir, 'checkpoints'),
                                                 config.keep_checkpoints)
    config_dict = config.to_dict()
    # Checkpoints are labelled by optimizer step, so a stop mid-epoch resumes exactly: the
    # epoch's permutation and augmentation keys are functions of (seed, epoch, step).
    start_step, saved, _ = checkpoints.restore_latest(
        run_checkpoints, state.state_dict(), config_dict, TEACHER_RESUME_FIELDS,
        fallback=config.get('resume_fallback', False))
    if saved is not None:
        state = state.replace_from(saved)
        logger.info('Resumed teacher training at step %d', start_step)
    start_step = start_step or 0

    train_step = make_train_step(model, config, steps_per_epoch, mesh)
    evaluator = common.Evaluator(model, config.dataset, test_images, test_labels,
                                 config.eval_batch_size, mesh)
    writer = reporting.MetricWriter(os.path.join(workdir, 'tensorboard'), active=is_main)
    total_steps = config.epochs * steps_per_epoch
    progress = reporting.Progress(start_step // steps_per_epoch, config.epochs)
    save = lambda step, force=False: run_checkpoints.save(
        step, state.state_dict(), {'config': config_dict, 'step': step}, force=force)
    stopped_at, order = None, None
    with PreemptionGuard() as preemption:
        for step in range(start_step, total_steps):
            epoch, i = divmod(step, steps_per_epoch)
            epoch_key = jax.random.fold_in(data_key, epoch)
            if order is None or i == 0:
                order = np.asarray(jax.random.permutation(epoch_key, len(train_labels)))
            idx = order[i * config.batch_size:(i + 1) * config.batch_size]
            images, labels = parallel.shard_batch((train_images[idx], train_labels[idx]), mesh)
            state, metrics = train_step(state, images, labels, jax.random.fold_in(epoch_key, i))
            done = step + 1
            stop = preemption.requested() or done - start_step == config.get('stop_after_steps', 0)
            if done % steps_per_epoch == 0:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(np.isfinite(v) for v in metrics.values()):
                    raise NonFiniteLossError(
                        f'teacher training loss became non-finite in epoch {epoch + 1}: '
                        f'{metrics}; the last good checkpoint is in {run_checkpoints.directory}')
                writer.scalars(epoch + 1, {f'train/{k}': v for k, v in metrics.items()})
                if (epoch + 1) % config.log_every == 0 or done == total_steps:
                    logger.info(progress.line(epoch + 1, metrics))
                if (epoch + 1) % config.checkpoint_every == 0 or done == total_steps:
                    save(done)
            if stop and done < total_steps:
                save(done, force=True)
                stopped_at = done
                break
    run_checkpoints.wait()
    run_checkpoints.close()
    if stopped_at is not None:
        writer.close()
        return checkpoints.stopped('teacher', run_checkpoints, stopped_at, 'step')

    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    accuracy = evaluator(variables)
    writer.scalars(config.epochs, {'eval/teacher_accuracy': accuracy})
    writer.close()
    logger.info('Teacher %s test accuracy on %s: %.2f%%', config.teacher.arch, config.dataset,
                100 * accuracy)
    teacher_path = config.teacher.get('checkpoint', '') or os.path.join(workdir, 'teacher')
    checkpoints.save_teacher(teacher_path, variables, {
        'arch': config.teacher.arch, 'base_width': config.teacher.base_width,
        'num_classes': info.num_classes, 'image_shape': list(info.image_shape),
        'dataset': config.dataset, 'test_accuracy': accuracy, 'source': 'trained',
        'epochs': config.epochs})
    results = {'job': 'teacher', 'teacher_accuracy': accuracy, 'teacher_path':
               os.path.abspath(teacher_path), 'wall_time_s': time.time() - start_time,
               'config': config_dict}
    reporting.write_results(workdir, results, active=is_main)
    logger.info('Teacher written to %s', teacher_path)
    return results
