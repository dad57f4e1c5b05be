"""The few-shot KD+AT baseline (docs/method.md, section "Few-shot baseline KD+AT"), and the
paper's "ours + M": the same job started from a zero-shot student (``config.init_student_from``).

The student learns from M images per class (M = -1: the whole training set) with
loss = (1 - alpha) CE + 2 alpha tau^2 KL_mean + beta AT (losses.kd_at_loss), the teacher's SGD
recipe (teacher.py) and its augmentation. The number of iterations is the full-data run's,
whatever M: the authors scale the number of epochs by N / (C M) (their main.py), which at a fixed
batch size keeps the number of iterations (and the images seen) equal.

Batches are consecutive slices of an endless stream of per-epoch permutations of the M*C images,
so every batch is full (M*C may be smaller than the batch), and the batch of iteration i is a
function of (seed, i) alone, which makes a resumed run identical to an uninterrupted one.

Writes ``{workdir}/checkpoints`` (``{'student': state}``, the format students.load_student
reads), ``tensorboard/`` and ``results.json``, as the zero-shot job does.
"""
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zskt_jax import checkpoints, common, data, loop, losses, parallel, reporting, students
from zskt_jax.errors import ConfigError
from zskt_jax.parallel import DATA_AXIS
from zskt_jax.state import create_state, sgd
from zskt_jax.teacher import augment, step_learning_rate

logger = reporting.logger



# ----------------------------------------------------------------------------------------------
# Data: M images per class, and the batch stream

def sample_per_class(labels: np.ndarray, images_per_class: int, seed: int,
                     num_classes: int) -> np.ndarray:
    """Indices of the first M images of each class after a seeded shuffle of the training set
    (docs/method.md), in that shuffled order; M = -1: every index (in the stored order)."""
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
    attention_pairs = common.attention_pairs(config)

    def per_device(state, teacher_variables, images, labels, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(DATA_AXIS))
        images = augment(key, images, config.augment)
        x = data.normalize(images, config.dataset)
        # The teacher's milestones (fractions of the run), in iterations of this run.
        lr = step_learning_rate(config.learning_rate, state.step, total_iterations,
                                config.lr_milestones, config.lr_decay)
        # Teacher: inference-mode BN, frozen (docs/method.md, section "BatchNorm modes").
        teacher_logits, teacher_activations = teacher_model.apply(teacher_variables, x,
                                                                  train=False)

        def loss_fn(params):
            (logits, activations), updated = student_model.apply(
                {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
                mutable=['batch_stats'])
            teacher_stages, student_stages = losses.paired_stages(
                teacher_activations, activations, attention_pairs)
            loss, ce, kl, at = losses.kd_at_loss(logits, teacher_logits, labels, student_stages,
                                                 teacher_stages, config.alpha,
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
    # load_student reads both zero-shot and few-shot checkpoints
    _, variables, run_config, meta = students.load_student(config.init_student_from, mesh,
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


def _restore_or_initialise(config, state, mesh, run):
    """(start iteration, student state, record of its initialisation): the run's latest
    checkpoint, else the student of ``config.init_student_from``, else ``state`` as it is."""
    start, saved, meta = run.restore({'student': state.state_dict()})
    if saved is not None:
        return start, state.replace_from(saved['student']), meta.get('init_student')
    if not config.init_student_from:
        return 0, state, None
    state, source = _initial_student(config, state, mesh)
    return 0, state, {'workdir': source['workdir'], 'iteration': source['step'],
                      'job': source['config'].get('job')}


def _make_evaluate(config, student_model, mesh, run, eval_split, teacher_accuracy: float,
                   total_iterations: int):
    """``evaluate(iteration, state)``: the student's test accuracy into the run's history,
    TensorBoard and the log."""
    evaluator = common.Evaluator(student_model, config.dataset, *eval_split,
                                 config.eval_batch_size, mesh)

    def evaluate(iteration, state):
        accuracy = evaluator({'params': state.params, 'batch_stats': state.batch_stats})
        elapsed = run.clock()  # time to accuracy
        run.history.append({'iteration': iteration, 'student_accuracy': accuracy,
                            'wall_time_s': elapsed})
        run.writer.write_scalars(iteration, {'eval/student_accuracy': accuracy,
                                       'eval/teacher_accuracy': teacher_accuracy,
                                       'eval/wall_time_s': elapsed})
        run.writer.flush()
        logger.info('[%d/%d] student test accuracy %.2f%% (teacher %.2f%%)', iteration,
                    total_iterations, 100 * accuracy, 100 * teacher_accuracy)

    return evaluate


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Train the student with KD+AT on M images per class; returns the results written to
    ``{workdir}/results.json``."""
    setup = common.resolve_distillation(config, with_generator=False)
    info, mesh, teacher_variables = setup.info, setup.mesh, setup.teacher_variables
    teacher_model, student_model = setup.models.teacher, setup.models.student

    train_images, train_labels = common.load_split(config, info.train_split)
    subset = sample_per_class(train_labels, config.images_per_class, config.seed,
                              info.num_classes)
    # The full-data run's iterations, whatever M (docs/method.md).
    total_iterations = num_iterations(config, len(train_labels))
    train_images, train_labels = train_images[subset], train_labels[subset]
    logger.info('KD+AT on %d training images (M = %d per class), %d iterations of batch %d '
                '(%.1f passes over them)', len(subset), config.images_per_class, total_iterations,
                config.batch_size, total_iterations * config.batch_size / len(subset))

    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    tx = sgd(config.momentum, config.weight_decay, config.nesterov)
    state = create_state(student_model, init_key, jnp.zeros((2,) + info.image_shape), tx)
    state = parallel.replicate(state, mesh)
    teacher_path = setup.teacher_path
    run = loop.RunDir(workdir, config,
                      validate_meta=checkpoints.same_teacher_as(setup.teacher_meta, teacher_path))
    start, state, init_meta = _restore_or_initialise(config, state, mesh, run)
    run.record = {'teacher_path': teacher_path,
                  'teacher_checksum': setup.teacher_meta['checksum'], 'init_student': init_meta}
    teacher_accuracy = setup.teacher_accuracy(config)
    evaluate = _make_evaluate(config, student_model, mesh, run, setup.eval_split,
                              teacher_accuracy, total_iterations)
    if start == 0 and config.init_student_from:
        evaluate(0, state)  # the zero-shot student before fine-tuning

    train_step = make_train_step(student_model, teacher_model, config, total_iterations, mesh)
    stream = BatchStream(len(subset), config.batch_size, config.seed)
    progress = reporting.Progress(start, total_iterations)

    def step(state, iteration):
        idx = stream(iteration)
        images, labels = parallel.shard_batch((train_images[idx], train_labels[idx]), mesh)
        return train_step(state, teacher_variables, images, labels,
                          jax.random.fold_in(data_key, iteration))

    def log(done, metrics):
        logger.info(progress.line(done, {k: metrics[k] for k in (
            'loss', 'ce', 'kl', 'attention', 'train_accuracy', 'learning_rate')}))
        run.writer.write_scalars(done, {f'train/{k}': v for k, v in metrics.items()})

    end = loop.train_loop(
        step, state, start, total_iterations,
        loop.Cadence.of(config),
        run=run, state_dict=lambda state: {'student': state.state_dict()},
        read_metrics=loop.read_scalars, log=log, evaluate=evaluate, progress=progress)
    if end.stopped_at is not None:
        return run.stopped('few_shot', end.stopped_at)
    if not run.history or run.history[-1]['iteration'] != total_iterations:
        evaluate(total_iterations, end.state)  # resumed from the last checkpoint
    results = {
        'job': 'few_shot',
        # The FINAL iterate is the reported result (docs/method.md, section "Evaluation").
        'student_accuracy': run.history[-1]['student_accuracy'],
        'teacher_accuracy': teacher_accuracy, 'images_per_class': config.images_per_class,
        'train_images': int(len(subset)), 'iterations': total_iterations,
        'init_student': init_meta, 'final_train_metrics': end.metrics,
        'teacher_path': teacher_path,
    }
    path = run.finish(results)
    if path:
        logger.info('Student %.2f%%, teacher %.2f%% (M = %d per class); results in %s',
                    100 * results['student_accuracy'], 100 * teacher_accuracy,
                    config.images_per_class, path)
    return results
