"""The few-shot KD+AT baseline (REFERENCE.md, "Few-shot baseline KD+AT"), and the paper's
"ours + M": the same job started from a zero-shot student (``config.init_student_from``).

The student learns from M images per class (M = -1: the whole training set) with
loss = (1 - alpha) CE + 2 alpha tau^2 KL_mean + beta AT (losses.kd_at_loss), the teacher's SGD
recipe (teacher.py) and its augmentation. The number of iterations is the full-data run's,
whatever M: the authors scale the number of epochs by N / (C M) (their main.py), which at a fixed
batch size keeps the number of iterations (and the images seen) equal.

Batches are consecutive slices of an endless stream of per-epoch permutations of the M*C images,
so every batch is full (M*C may be smaller than the batch), and the batch of iteration i is a
function of (seed, i) alone, which makes a resumed run identical to an uninterrupted one.

Writes ``{workdir}/checkpoints`` (``{'student': state}``, the format belief.load_student reads),
``tensorboard/`` and ``results.json``, as the zero-shot job does.
"""
import os
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
from zskt_jax.teacher import augment, step_learning_rate

logger = reporting.logger

# Fields that must agree between a checkpoint and the run resuming from it.
RESUME_FIELDS = ('dataset', 'teacher.arch', 'teacher.base_width', 'student.arch',
                 'student.base_width', 'images_per_class', 'full_data_epochs', 'scale_iterations',
                 'batch_size', 'learning_rate', 'momentum', 'nesterov', 'weight_decay',
                 'lr_milestones', 'lr_decay', 'augment', 'alpha', 'temperature', 'beta', 'seed',
                 'init_student_from', 'compute_dtype')


# ----------------------------------------------------------------------------------------------
# Data: M images per class, and the batch stream

def sample_per_class(labels: np.ndarray, images_per_class: int, seed: int,
                     num_classes: int) -> np.ndarray:
    """Indices of the first M images of each class after a seeded shuffle of the training set
    (REFERENCE.md), in that shuffled order; M = -1: every index (in the stored order)."""
    labels = np.asarray(labels)
    if images_per_class < 0:
        return np.arange(len(labels))
    if images_per_class == 0:
        raise ConfigError('config.images_per_class = 0: the few-shot job needs images; M = 0 is '
                         'the zero-shot job (configs/*.py with job = zero_shot).')
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < images_per_class:
        raise ConfigError(f'config.images_per_class = {images_per_class} but class '
                         f'{int(counts.argmin())} has only {int(counts.min())} training images; '
                         f'choose at most {int(counts.min())} (or -1 for all the data).')
    order = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[order]
    # Rank of each shuffled image within its class: 0 for the first of its class, 1, ...
    rank = np.zeros(len(order), np.int64)
    for c in range(num_classes):
        members = shuffled == c
        rank[members] = np.arange(int(members.sum()))
    return order[rank < images_per_class]


class BatchStream:
    """Batch i = positions [i B, (i + 1) B) of the concatenation of per-epoch permutations of
    range(n); epoch e's permutation is drawn from (seed, e). Returns indices into the subset."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._cache = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return self._cache[epoch]

    def __call__(self, iteration: int) -> np.ndarray:
        positions = iteration * self.batch_size + np.arange(self.batch_size)
        epochs, offsets = np.divmod(positions, self.n)
        out = np.empty(self.batch_size, np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self._permutation(int(epoch))[offsets[where]]
        return out


def num_iterations(config, full_train_size: int) -> int:
    """The full-data run's iterations: full_data_epochs * (N // batch) as in teacher.py (times
    ``scale_iterations``, the authors' scale_n_iters, 1 for the paper's numbers)."""
    steps_per_epoch = full_train_size // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f'config.batch_size = {config.batch_size} exceeds the {full_train_size} '
                         f'training examples of {config.dataset}')
    return max(1, int(round(config.scale_iterations * config.full_data_epochs * steps_per_epoch)))


# ----------------------------------------------------------------------------------------------
# The compiled step

def make_train_step(student_model, teacher_model, config, total_iterations: int, mesh):
    """Compiled KD+AT SGD step: (state, teacher_variables, images uint8, labels, key) ->
    (state, metrics), data parallel like teacher.make_train_step."""
    def per_device(state, teacher_variables, images, labels, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        images = augment(key, images, config.augment)
        x = data.normalize(images, config.dataset)
        # The teacher's milestones (fractions of the run), in iterations of this run.
        lr = step_learning_rate(config.learning_rate, state.step, total_iterations,
                                config.lr_milestones, config.lr_decay)
        # Teacher: inference-mode BN, frozen (REFERENCE.md, "BatchNorm modes").
        teacher_logits, teacher_activations = teacher_model.apply(teacher_variables, x,
                                                                  train=False)

        def loss_fn(params):
            (logits, activations), updated = student_model.apply(
                {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                mutable=['batch_stats'])
            loss, ce, kl, at = losses.kd_at_loss(logits, teacher_logits, labels, activations,
                                                 teacher_activations, config.alpha,
                                                 config.temperature, config.beta)
            return jax.lax.pmean(loss, DATA_AXIS), (updated['batch_stats'], logits, ce, kl, at)

        (loss, (stats, logits, ce, kl, at)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads, lr, stats).replace(step=state.step + 1)
        pmean = lambda v: jax.lax.pmean(v, DATA_AXIS)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        agreement = jnp.mean((jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
                             .astype(jnp.float32))
        return state, {'loss': loss, 'ce': pmean(ce), 'kl': pmean(kl), 'attention': pmean(at),
                       'train_accuracy': pmean(accuracy), 'agreement': pmean(agreement),
                       'learning_rate': lr}

    batch = P(DATA_AXIS)
    return jax.jit(parallel.data_parallel(per_device, mesh, (P(), P(), batch, batch, P()),
                                          (P(), P())))


# ----------------------------------------------------------------------------------------------
# The job: python run.py --config=configs/few_shot_digits.py --workdir=runs/few_shot_digits

def _initial_student(config, state, mesh):
    """``state`` with the params and BN statistics of the zero-shot (or any) student at
    ``config.init_student_from``, checked to be the same network for the same teacher."""
    from zskt_jax import belief  # load_student reads both zero-shot and few-shot checkpoints
    _, variables, run_config, meta = belief.load_student(config.init_student_from, mesh,
                                                         dtype_config=config)
    problems = checkpoints.compare_configs(run_config.to_dict(), config.to_dict(), (
        'dataset', 'student.arch', 'student.base_width', 'teacher.arch', 'teacher.base_width'))
    if problems:
        raise checkpoints.CheckpointMismatchError(
            f'config.init_student_from = {config.init_student_from} holds another setup:\n  '
            + '\n  '.join(problems))
    logger.info('Student initialised from %s (%s run, iteration %d)', meta['workdir'],
                run_config.get('job'), meta['step'])
    return state.replace(params=variables['params'], batch_stats=variables['batch_stats']), meta


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Train the student with KD+AT on M images per class; returns the results written to
    ``{workdir}/results.json``."""
    clock = reporting.RunClock()  # wall time, summed over resumes
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    info = data.dataset_info(config.dataset)
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.batch_size, mesh)

    teacher_variables, teacher_meta = common.load_teacher_for(config)
    teacher_model = common.build_network(config.teacher, info.num_classes, config)
    student_model = common.build_network(config.student, info.num_classes, config)
    teacher_variables = parallel.replicate(teacher_variables, mesh)

    train_images, train_labels = common.load_split(config, info.train_split)
    subset = sample_per_class(train_labels, config.images_per_class, config.seed,
                              info.num_classes)
    # The full-data run's iterations, whatever M (REFERENCE.md).
    total_iterations = num_iterations(config, len(train_labels))
    train_images, train_labels = train_images[subset], train_labels[subset]
    logger.info('KD+AT on %d training images (M = %d per class), %d iterations of batch %d '
                '(%.1f passes over them)', len(subset), config.images_per_class, total_iterations,
                config.batch_size, total_iterations * config.batch_size / len(subset))

    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    tx = sgd(config.momentum, config.weight_decay, config.get('nesterov', False))
    state = create_state(student_model, init_key, jnp.zeros((2,) + info.image_shape), tx)
    state = parallel.replicate(state, mesh)

    run_checkpoints = checkpoints.RunCheckpoints(os.path.join(workdir, 'checkpoints'),
                                                 config.keep_checkpoints)
    config_dict = config.to_dict()

    same_teacher = checkpoints.same_teacher_as(teacher_meta, common.teacher_dir(config))
    # Resume from the latest checkpoint of this workdir, if any (as zero_shot.py does).
    start_iteration, saved, meta = checkpoints.restore_latest(
        run_checkpoints, {'student': state.state_dict()}, config_dict, RESUME_FIELDS,
        fallback=config.get('resume_fallback', False), validate_meta=same_teacher)
    history, init_meta = [], None
    if saved is not None:
        state = state.replace_from(saved['student'])
        history, init_meta = meta.get('history', []), meta.get('init_student')
        clock.resume(meta)
        logger.info('Resumed from %s/%d', run_checkpoints.directory, start_iteration)
    else:
        start_iteration = 0
        if config.init_student_from:
            state, source = _initial_student(config, state, mesh)
            init_meta = {'workdir': source['workdir'], 'iteration': source['step'],
                         'job': source['config'].get('job')}

    def save(iteration, state, force=False):
        run_checkpoints.save(iteration, {'student': state.state_dict()},
                             {'config': config_dict, 'iteration': iteration,
                              'teacher_path': os.path.abspath(common.teacher_dir(config)),
                              'teacher_checksum': teacher_meta['checksum'], 'history': history,
                              'wall_time_s': clock(),
                              'init_student': init_meta}, force=force)

    eval_images, eval_labels = common.load_eval_split(config)
    evaluator = common.Evaluator(student_model, config.dataset, eval_images, eval_labels,
                                 config.eval_batch_size, mesh)
    teacher_accuracy = common.Evaluator(teacher_model, config.dataset, eval_images, eval_labels,
                                        config.eval_batch_size, mesh)(teacher_variables)
    logger.info('Teacher %s test accuracy: %.2f%%', config.teacher.arch, 100 * teacher_accuracy)
    writer = reporting.MetricWriter(os.path.join(workdir, 'tensorboard'), active=is_main)

    def evaluate(iteration, state):
        accuracy = evaluator({'params': state.params, 'batch_stats': state.batch_stats})
        elapsed = clock()  # time to accuracy
        history.append({'iteration': iteration, 'student_accuracy': accuracy,
                        'wall_time_s': elapsed})
        writer.scalars(iteration, {'eval/student_accuracy': accuracy,
                                   'eval/teacher_accuracy': teacher_accuracy,
                                   'eval/wall_time_s': elapsed})
        writer.flush()
        logger.info('[%d/%d] student test accuracy %.2f%% (teacher %.2f%%)', iteration,
                    total_iterations, 100 * accuracy, 100 * teacher_accuracy)
        return accuracy

    if start_iteration == 0 and config.init_student_from:
        evaluate(0, state)  # the zero-shot student before fine-tuning

    train_step = make_train_step(student_model, teacher_model, config, total_iterations, mesh)
    stream = BatchStream(len(subset), config.batch_size, config.seed)
    progress = reporting.Progress(start_iteration, total_iterations)
    stop_after = config.get('stop_after_iterations', 0)
    stopped_at, metrics = None, {}
    with PreemptionGuard() as preemption:
        for iteration in range(start_iteration, total_iterations):
            idx = stream(iteration)
            images, labels = parallel.shard_batch((train_images[idx], train_labels[idx]), mesh)
            new_state, step_metrics = train_step(state, teacher_variables, images, labels,
                                                 jax.random.fold_in(data_key, iteration))
            step_metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            if not all(np.isfinite(v) for v in step_metrics.values()):
                save(iteration, state, force=True)  # the last good state
                run_checkpoints.wait()
                bad = {k: v for k, v in step_metrics.items() if not np.isfinite(v)}
                raise NonFiniteLossError(
                    f'Non-finite values at iteration {iteration + 1}: {bad}. The state before it '
                    f'is saved in {run_checkpoints.directory}/{iteration}; lower the learning '
                    'rate.')
            state, metrics = new_state, step_metrics
            done = iteration + 1
            if done % config.log_every == 0 or done == total_iterations:
                logger.info(progress.line(done, {k: metrics[k] for k in (
                    'loss', 'ce', 'kl', 'attention', 'train_accuracy', 'learning_rate')}))
                writer.scalars(done, {f'train/{k}': v for k, v in metrics.items()})
            if done % config.eval_every == 0 or done == total_iterations:
                evaluate(done, state)
            stop = preemption.requested() or (stop_after and done - start_iteration >= stop_after)
            if done % config.checkpoint_every == 0 or done == total_iterations or stop:
                save(done, state, force=bool(stop))
            if stop and done < total_iterations:
                stopped_at = done
                break

    run_checkpoints.wait()
    run_checkpoints.close()
    if stopped_at is not None:
        writer.close()
        return checkpoints.stopped('few_shot', run_checkpoints, stopped_at)
    if not history or history[-1]['iteration'] != total_iterations:
        evaluate(total_iterations, state)
    writer.close()
    results = {
        'job': 'few_shot',
        # The FINAL iterate is the reported result (REFERENCE.md, "Evaluation").
        'student_accuracy': history[-1]['student_accuracy'],
        'teacher_accuracy': teacher_accuracy,
        'images_per_class': config.images_per_class,
        'train_images': int(len(subset)),
        'iterations': total_iterations,
        'init_student': init_meta,
        'wall_time_s': clock(),
        'history': history,
        'final_train_metrics': metrics,
        'teacher_path': os.path.abspath(common.teacher_dir(config)),
        'devices': jax.device_count(),
        'backend': jax.default_backend(),
        'config': config_dict,
    }
    path = reporting.write_results(workdir, results, active=is_main)
    if path:
        logger.info('Student %.2f%%, teacher %.2f%% (M = %d per class); results in %s',
                    100 * results['student_accuracy'], 100 * teacher_accuracy,
                    config.images_per_class, path)
    return results
