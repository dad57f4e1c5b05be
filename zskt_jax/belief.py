"""Belief matching: transition curves and the Mean Transition Error (docs/method.md, section
"Belief matching"; paper Section 4.4, Table 2, Figure 4).

Network A (attacked: a student from a zero-shot or few-shot run) and network B (the reference:
that run's teacher), both in inference mode. For each of the first ``num_images`` test images (in
a seeded shuffled order) on which A and B predict the same class, and for each of the 9 classes j
other than the image's TRUE label, K steps of plain gradient descent on A's cross-entropy towards
j move the image: x <- x - xi * grad_x CE(A(x), j), in normalised input space, no sign, no
clipping. p_A(j) and p_B(j) are recorded at every step BEFORE the update, so step 0 holds the
unperturbed image. MTE = mean over images, targets and the first ``mte_steps`` steps of
|p_A(j) - p_B(j)|.

All image*target pairs of a chunk are attacked at once, data parallel over the ``data`` mesh (each
device attacks its slice of the pairs): one jitted ``lax.scan`` over the K steps, or on CPU one
jitted step called K times (``config.attack_loop``; XLA:CPU is slow inside loops). With
inference-mode BatchNorm the pairs do not interact, so the gradient of the SUMMED cross-entropy
with respect to the batch is exactly each pair's own gradient (the authors' code attacks one
image at a time, batch size 1).

Outputs in the workdir: ``curves.npz``, ``results.json`` (MTE, accuracies) and
``transition_curves.png`` (the mean curves over steps 0..30 with +-2 standard-error bands).
"""
import math
import os
import time
from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P
from etils import epath

from zskt_jax import checkpoints, common, data, parallel, paths, reporting
from zskt_jax.errors import ConfigError, UserError
from zskt_jax.parallel import DATA_AXIS
# The students of zero-shot and few-shot runs, importable from here as before.
from zskt_jax.students import StudentNotFoundError, load_student  # noqa: F401

logger = reporting.logger


# ----------------------------------------------------------------------------------------------
# Image selection and targets

def agreeing_indices(predictions_a: np.ndarray, predictions_b: np.ndarray, seed: int,
                     num_images: int) -> np.ndarray:
    """Test-set indices, in a seeded shuffled order, of the first ``num_images`` images on which
    A and B predict the same class (-1: all of them). The authors' code shuffles with a seeded
    DataLoader and keeps matches until it has enough; too few matches is an error there too."""
    predictions_a, predictions_b = np.asarray(predictions_a), np.asarray(predictions_b)
    order = np.random.default_rng(seed).permutation(len(predictions_a))
    agreeing = order[predictions_a[order] == predictions_b[order]]
    if num_images < 0:
        if len(agreeing) == 0:
            raise UserError(f'The two networks classify none of the {len(order)} test images '
                             'alike: there is nothing to attack. Is network A trained?')
        return agreeing
    if len(agreeing) < num_images:
        raise ConfigError(
            f'Only {len(agreeing)} of the {len(order)} test images are classified alike by the '
            f'two networks; config.num_images = {num_images} needs that many. Lower '
            'config.num_images (-1 takes every agreeing image).')
    return agreeing[:num_images]


def target_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[N] true labels -> [N, C-1] target classes: every class but the true one, in the authors'
    order j = (y + 1 + k) mod C, k = 0..C-2."""
    labels = np.asarray(labels, np.int64)
    return ((labels[:, None] + 1 + np.arange(num_classes - 1)[None, :]) % num_classes).astype(
        np.int32)


def mean_transition_error(curves_a: np.ndarray, curves_b: np.ndarray, steps: int = 100) -> float:
    """Mean over images, targets and the first ``steps`` steps of |p_A(j) - p_B(j)|."""
    curves_a, curves_b = np.asarray(curves_a), np.asarray(curves_b)
    return float(np.mean(np.abs(curves_a[..., :steps].astype(np.float64)
                                - curves_b[..., :steps].astype(np.float64))))


# ----------------------------------------------------------------------------------------------
# The compiled attack

def _target_probability(apply, variables, x, targets):
    """p(target) under one network, [b]. Behind an optimization barrier, so that XLA compiles p_A
    and p_B as the same plain forward pass (not merged with the forward inside A's gradient): a
    network compared with itself then gives identical curves and an MTE of exactly 0."""
    variables, x = jax.lax.optimization_barrier((variables, x))
    logits, _ = apply(variables, x, train=False)
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), -1)
    return jnp.take_along_axis(probabilities, targets[:, None], axis=-1)[:, 0]


def attack_step(apply_a: Callable, apply_b: Callable, variables_a, variables_b, x, targets,
                step_size: float):
    """One step of the attack on a batch of (image, target) pairs; per-device code, pure JAX.

    x: [b, H, W, C] normalised images; targets [b] int. Returns (next x, p_a [b], p_b [b]), the
    probabilities being those of x, i.e. recorded BEFORE the update.
    """
    def a_loss(x):
        logits, _ = apply_a(variables_a, x, train=False)
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                                    targets[:, None], axis=-1)[:, 0]
        # Summed, not averaged: with inference-mode BN each pair's gradient is its own CE's
        # gradient, as with the authors' batch of one image.
        return -jnp.sum(log_p)

    p_a = _target_probability(apply_a, variables_a, x, targets)
    p_b = _target_probability(apply_b, variables_b, x, targets)
    # Plain gradient descent on CE(A(x), j): no sign, no projection, no clipping.
    return x - step_size * jax.grad(a_loss)(x), p_a, p_b


def attack_curves(apply_a: Callable, apply_b: Callable, variables_a, variables_b, x, targets,
                  num_steps: int, step_size: float):
    """Transition curves of a batch of pairs as one ``lax.scan`` over the K steps; per-device.

    Returns (p_a, p_b), each [b, num_steps]: p(target) under A and B at steps 0..K-1.
    """
    def step(x, _):
        x, p_a, p_b = attack_step(apply_a, apply_b, variables_a, variables_b, x, targets,
                                  step_size)
        return x, (p_a, p_b)

    _, (p_a, p_b) = jax.lax.scan(step, x, None, length=num_steps)
    return p_a.T, p_b.T  # [b, K]


def use_scan(loop: str) -> bool:
    """config.attack_loop: 'scan' | 'steps' | 'auto' (steps on CPU). XLA:CPU runs convolution
    gradients inside a while loop in a slow generic form: measured on a 2-core CPU (digits
    networks, 180 pairs), 0.84 s a step as a scan against 0.14 s as one jitted step a call."""
    if loop not in ('auto', 'scan', 'steps'):
        raise ConfigError(f"config.attack_loop = {loop!r}; choose 'auto', 'scan' or 'steps'")
    return loop == 'scan' or (loop == 'auto' and jax.default_backend() != 'cpu')


def make_attack_fn(model_a, model_b, dataset: str, num_steps: int, step_size: float, mesh,
                   loop: str = 'auto'):
    """(variables_a, variables_b, images uint8 [P, H, W, C], targets [P]) -> (p_a, p_b) [P, K],
    the pairs split over the ``data`` mesh, the variables replicated. ``loop`` 'scan': one
    compiled ``lax.scan`` over the K steps; 'steps': one compiled step called K times, the
    images staying on the devices between calls; both compute the same thing."""
    batch = P(DATA_AXIS)
    if use_scan(loop):
        def per_device(variables_a, variables_b, images, targets):
            x = data.normalize(images, dataset)
            return attack_curves(model_a.apply, model_b.apply, variables_a, variables_b, x,
                                 targets, num_steps, step_size)

        return jax.jit(parallel.data_parallel(per_device, mesh, (P(), P(), batch, batch),
                                              (batch, batch)))

    normalize = jax.jit(parallel.data_parallel(lambda images: data.normalize(images, dataset),
                                               mesh, (batch,), batch))
    step = jax.jit(parallel.data_parallel(
        lambda variables_a, variables_b, x, targets: attack_step(
            model_a.apply, model_b.apply, variables_a, variables_b, x, targets, step_size),
        mesh, (P(), P(), batch, batch), (batch, batch, batch)))
    stack = jax.jit(lambda curves: jnp.stack(curves, axis=1))  # K x [P] -> [P, K]
    # On CPU, collectives dispatched in a loop without waiting can deadlock: wait on each call.
    block = jax.default_backend() == 'cpu'

    def attack(variables_a, variables_b, images, targets):
        x = normalize(images)
        curves_a, curves_b = [], []
        for _ in range(num_steps):
            x, p_a, p_b = step(variables_a, variables_b, x, targets)
            if block:
                jax.block_until_ready(x)
            curves_a.append(p_a)
            curves_b.append(p_b)
        return stack(curves_a), stack(curves_b)

    return attack


def make_predict_fn(model, dataset: str, mesh):
    """Compiled (variables, images uint8 [B, ...]) -> argmax predictions [B], data parallel."""
    def per_device(variables, images):
        logits, _ = model.apply(variables, data.normalize(images, dataset), train=False)
        return jnp.argmax(logits, -1).astype(jnp.int32)

    batch = P(DATA_AXIS)
    return jax.jit(parallel.data_parallel(per_device, mesh, (P(), batch), batch))


def _padded_chunks(num: int, chunk: int):
    for start in range(0, num, chunk):
        yield start, min(start + chunk, num)


def _to_host(array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _round_to_devices(batch_size: int, mesh) -> int:
    devices = mesh.devices.size
    return int(math.ceil(max(batch_size, 1) / devices) * devices)


def predict(predict_fn, variables, images: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """Argmax predictions over a whole split in host memory (padding dropped)."""
    batch_size = _round_to_devices(batch_size, mesh)
    out = []
    for start, stop in _padded_chunks(len(images), batch_size):
        chunk, _, mask = parallel.pad_batch(images[start:stop], np.zeros(stop - start, np.int32),
                                            batch_size)
        out.append(_to_host(predict_fn(variables, parallel.shard_batch(chunk, mesh)))[mask])
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def transition_curves(attack_fn, variables_a, variables_b, images: np.ndarray,
                      targets: np.ndarray, batch_size: int, mesh,
                      log_every: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Curves of every (image, target) pair: images [N, H, W, C] uint8, targets [N, T] ->
    (p_a, p_b), each [N, T, K]. The N*T pairs are attacked ``batch_size`` at a time (rounded up
    to a multiple of the device count); the last chunk is padded and its padding dropped."""
    n, t = targets.shape
    pair_image = np.repeat(np.arange(n), t)  # [N*T]: the image of each pair
    pair_target = targets.reshape(-1).astype(np.int32)
    batch_size = _round_to_devices(batch_size, mesh)
    curves_a, curves_b = [], []
    start_time = time.time()
    for i, (start, stop) in enumerate(_padded_chunks(n * t, batch_size)):
        chunk_images, chunk_targets, mask = parallel.pad_batch(
            images[pair_image[start:stop]], pair_target[start:stop], batch_size)
        p_a, p_b = attack_fn(variables_a, variables_b,
                             *parallel.shard_batch((chunk_images, chunk_targets), mesh))
        curves_a.append(_to_host(p_a)[mask])
        curves_b.append(_to_host(p_b)[mask])
        if log_every and (i + 1) % log_every == 0:
            logger.info('attacked %d/%d image-target pairs (%.1f s)', stop, n * t,
                        time.time() - start_time)
    k = curves_a[0].shape[-1] if curves_a else 0
    return (np.concatenate(curves_a).reshape(n, t, k) if curves_a else np.zeros((n, t, 0)),
            np.concatenate(curves_b).reshape(n, t, k) if curves_b else np.zeros((n, t, 0)))


# ----------------------------------------------------------------------------------------------
# The figure

def plot_curves(path: str, curves_a: np.ndarray, curves_b: np.ndarray, max_step: int = 30,
                label_a: str = 'student (A, attacked)', label_b: str = 'teacher (B)',
                title: str = '') -> str:
    """Mean p_j over images and targets against the step, 0..max_step, with +-2 standard-error
    bands, for both networks (the paper's Figure 4). Written as a PNG with the Agg backend."""
    # A Figure with its own Agg canvas: no pyplot, no global backend switch, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.arange(min(max_step + 1, curves_a.shape[-1]))
    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for curves, label, color in ((curves_a, label_a, 'tab:blue'), (curves_b, label_b, 'tab:red')):
        flat = curves[..., :len(steps)].reshape(-1, len(steps)).astype(np.float64)  # [N*T, S]
        mean = flat.mean(0)
        stderr = flat.std(0, ddof=1) / np.sqrt(len(flat)) if len(flat) > 1 else np.zeros_like(mean)
        ax.plot(steps, mean, color=color, label=label)
        ax.fill_between(steps, mean - 2 * stderr, mean + 2 * stderr, color=color, alpha=0.25,
                        linewidth=0)
    ax.set_xlabel('adversarial step k')
    ax.set_ylabel('$p_j$')
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(steps[0], steps[-1] if len(steps) > 1 else 1)
    ax.legend(loc='best', fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with epath.Path(path).open('wb') as f:
        fig.savefig(f, format='png')
    return path


# ----------------------------------------------------------------------------------------------
# The job: python run.py --config=configs/belief_digits.py --config.student_workdir=runs/digits

def _reference_network(config, run_config, meta):
    """The teacher of the student's run (its recorded path, or config.teacher_checkpoint),
    loaded and checked with common.load_teacher_for; returns (model, variables, teacher_meta)."""
    teacher_config = ml_collections.ConfigDict(run_config.to_dict())
    teacher_config.compute_dtype = config.compute_dtype
    recorded = meta.get('teacher_path') or ''
    teacher_config.teacher.checkpoint = config.teacher_checkpoint or recorded or \
        run_config.teacher.get('checkpoint', '')
    variables, teacher_meta = common.load_teacher_for(teacher_config)
    recorded_checksum = meta.get('teacher_checksum')
    if recorded_checksum and teacher_meta.get('checksum') != recorded_checksum:
        message = (f'The teacher at {common.teacher_dir(teacher_config)} (checksum '
                   f"{teacher_meta.get('checksum', '')[:12]}...) is not the one the student at "
                   f"{meta['workdir']} was trained against ({recorded_checksum[:12]}...).")
        if not config.teacher_checkpoint:
            raise checkpoints.CheckpointMismatchError(
                message + ' Pass --config.teacher_checkpoint to compare with another network on '
                'purpose.')
        logger.warning(message + ' Using it as asked (config.teacher_checkpoint).')
    info = data.dataset_info(teacher_config.dataset)
    model = common.build_network(teacher_config.teacher, info.num_classes, teacher_config)
    return model, variables, teacher_meta, common.teacher_dir(teacher_config)


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Transition curves and MTE of a run's student against its teacher; returns the results
    written to ``{workdir}/results.json``."""
    start_time = time.time()
    is_main = jax.process_index() == 0
    if not config.student_workdir:
        raise ConfigError('config.student_workdir is empty: set it to the --workdir of a '
                         'zero-shot or few-shot run (--config.student_workdir=runs/digits).')
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()

    model_a, variables_a, run_config, meta = load_student(
        config.student_workdir, mesh, config.student_step, dtype_config=config)
    model_b, variables_b, teacher_meta, teacher_path = _reference_network(config, run_config, meta)
    variables_b = parallel.replicate(variables_b, mesh)
    dataset = run_config.dataset
    info = data.dataset_info(dataset)
    logger.info('A: %s %s from %s (iteration %d); B: teacher %s from %s',
                run_config.get('job'), run_config.student.arch, meta['workdir'], meta['step'],
                run_config.teacher.arch, teacher_path)

    data_dir = config.data_dir or run_config.get('data_dir', '') or None
    images, labels = data.load_split(dataset, info.test_split, data_dir)
    predictions_a = predict(make_predict_fn(model_a, dataset, mesh), variables_a, images,
                            config.eval_batch_size, mesh)
    predictions_b = predict(make_predict_fn(model_b, dataset, mesh), variables_b, images,
                            config.eval_batch_size, mesh)
    accuracy_a = float(np.mean(predictions_a == labels))
    accuracy_b = float(np.mean(predictions_b == labels))
    agreement = float(np.mean(predictions_a == predictions_b))
    indices = agreeing_indices(predictions_a, predictions_b, config.seed, config.num_images)
    targets = target_classes(labels[indices], info.num_classes)
    logger.info('Test accuracy A %.2f%%, B %.2f%%, agreement %.2f%%; attacking %d images x %d '
                'targets for %d steps (xi = %g)', 100 * accuracy_a, 100 * accuracy_b,
                100 * agreement, len(indices), targets.shape[1], config.num_steps,
                config.step_size)

    attack_fn = make_attack_fn(model_a, model_b, dataset, config.num_steps, config.step_size, mesh,
                               config.attack_loop)
    curves_a, curves_b = transition_curves(attack_fn, variables_a, variables_b, images[indices],
                                           targets, config.batch_size, mesh,
                                           log_every=config.log_every_chunks)
    mte_steps = min(config.mte_steps, config.num_steps)
    mte = mean_transition_error(curves_a, curves_b, mte_steps)
    logger.info('MTE (first %d steps) = %.4f', mte_steps, mte)

    if is_main:
        with epath.Path(workdir, 'curves.npz').open('wb') as f:
            np.savez_compressed(f, p_a=curves_a, p_b=curves_b, image_indices=indices,
                                labels=labels[indices], targets=targets)
        plot_curves(os.path.join(workdir, 'transition_curves.png'), curves_a, curves_b,
                    config.plot_steps,
                    label_a=f'{run_config.student.arch} ({run_config.get("job")}, A)',
                    label_b=f'{run_config.teacher.arch} (teacher, B)',
                    title=f'{dataset}: MTE = {mte:.3f} over {len(indices)} images')
    results = {
        'job': 'belief',
        'mte': mte,
        'mte_steps': mte_steps,
        'num_images': int(len(indices)),
        'num_steps': config.num_steps,
        'step_size': config.step_size,
        'student_accuracy': accuracy_a,
        'teacher_accuracy': accuracy_b,
        'test_agreement': agreement,
        'final_mean_p_a': float(curves_a[..., -1].mean()) if curves_a.size else float('nan'),
        'final_mean_p_b': float(curves_b[..., -1].mean()) if curves_b.size else float('nan'),
        'student_workdir': meta['workdir'],
        'student_job': run_config.get('job'),
        'student_iteration': meta['step'],
        'student_arch': run_config.student.arch,
        'teacher_path': paths.absolute(teacher_path),
        'teacher_arch': run_config.teacher.arch,
        'dataset': dataset,
    }
    path = reporting.finish_results(workdir, results, wall_time_s=time.time() - start_time,
                                    config=config.to_dict(), active=is_main)
    if path:
        logger.info('MTE %.4f (A %.2f%%, B %.2f%%); curves, plot and results in %s', mte,
                    100 * accuracy_a, 100 * accuracy_b, workdir)
    return results
