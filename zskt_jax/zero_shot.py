"""Zero-shot knowledge transfer, the job: the iteration compiled with its key streams, the
states it starts from, evaluation, and ``train_and_evaluate``.

The iteration's per-device body (Algorithm 1) is ``zskt_jax/iteration.py``; the state and its
saved form are ``state.ZeroShotState``.
"""
import functools
import logging
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from zskt_jax import checkpoints, common, parallel
from zskt_jax.common import Distillation, Models  # noqa: F401 (Models: zero_shot.Models)
from zskt_jax.errors import ConfigError, NonFiniteLossError  # noqa: F401 (raised by the loop)
# The iteration's names, importable from here as before (tests patch zero_shot._bn_layers).
from zskt_jax.iteration import (Stabilisers, _bn_layers, make_iteration_body,  # noqa: F401
                                max_shift, shard_body, use_unrolled_loops)
from zskt_jax.models.layers import INPUT_MOMENTS  # noqa: F401
from zskt_jax.state import ZeroShotState

logger = logging.getLogger('zskt_jax')


def draw_z(base_key, iteration, batch_size: int, z_dim: int):
    """The iteration's global z batch: a function of (seed key, iteration) only, so a resumed run
    needs no saved key stream and the device count does not change it."""
    return jax.random.normal(jax.random.fold_in(base_key, iteration), (batch_size, z_dim))


# fold_in(fold_in(z key, iteration), REPLAY_STREAM): the key of an iteration's replay draw.
REPLAY_STREAM = 1


def draw_replay_indices(base_key, iteration, batch_size: int, replay_size: int,
                        replay_batch: int):
    """The iteration's global replay draw: ``replay_batch`` rows, uniformly with replacement,
    of the memory rows written so far (this iteration's batch included), from (seed key,
    iteration) only, like z."""
    key = jax.random.fold_in(jax.random.fold_in(base_key, iteration), REPLAY_STREAM)
    filled = jnp.minimum((iteration + 1) * batch_size, replay_size)
    return jax.random.randint(key, (replay_batch,), 0, filled)


# fold_in(fold_in(z key, iteration), SHIFT_STREAM): the key of an iteration's student shifts.
SHIFT_STREAM = 2


def draw_shifts(base_key, iteration, num_images: int, image_size: int):
    """The iteration's global (dy, dx) shifts of the student's images (student_augment = 'crop'),
    [num_images, 2], uniform in [-H/8, H/8]: the new images' rows first, then the replayed
    ones'; from (seed key, iteration) only, like z."""
    key = jax.random.fold_in(jax.random.fold_in(base_key, iteration), SHIFT_STREAM)
    bound = max_shift(image_size)
    return jax.random.randint(key, (num_images, 2), -bound, bound + 1)


def make_iteration_fn(models: Models, config, mesh, donate: bool = False) -> Callable:
    """The compiled iteration: (state, teacher_variables, z_key) -> (state, metrics).

    ``donate``: the input state's buffers are reused for the output (the caller must not read
    the state it passed in again).

    jit(shard_map(body)) (``iteration.shard_body``), z (and the replay draw, the shifts) drawn
    inside from (z_key, iteration). With ``config.num_seeds = k > 1`` the states, keys and metrics carry a
    leading seed axis and the body is vmapped over it: k independent generator/student pairs,
    one teacher, one program.
    """
    stabilisers = Stabilisers.from_config(config)
    body = make_iteration_body(
        models, n_generator_steps=config.n_g, n_student_steps=config.n_s, beta=config.beta,
        num_iterations=config.num_iterations, generator_lr=config.generator_lr,
        student_lr=config.student_lr, unroll=use_unrolled_loops(config), stabilisers=stabilisers,
        attention_pairs=common.attention_pairs(config))
    draw = functools.partial(draw_z, batch_size=config.batch_size, z_dim=config.generator.z_dim)
    draw_replay = functools.partial(draw_replay_indices, batch_size=config.batch_size,
                                    replay_size=stabilisers.replay_size,
                                    replay_batch=stabilisers.replay_batch)
    draw_shift = None
    if stabilisers.shift:
        from zskt_jax import data
        draw_shift = functools.partial(
            draw_shifts, num_images=config.batch_size + stabilisers.replay_batch,
            image_size=data.dataset_info(config.dataset).image_shape[0])
    parallel.check_divisible(stabilisers.replay_batch, mesh, 'replay_batch')
    if num_seeds(config) > 1:
        draw, draw_replay = jax.vmap(draw), jax.vmap(draw_replay)
        draw_shift = draw_shift and jax.vmap(draw_shift)
    sharded = shard_body(body, mesh, num_seeds=num_seeds(config), replay=stabilisers.replay,
                         shift=stabilisers.shift)

    def iteration_fn(state: ZeroShotState, teacher_variables, z_key):
        iteration = state.student.step
        extras = ()
        if stabilisers.replay:
            extras += (state.replay, draw_replay(z_key, iteration))
        if stabilisers.shift:  # the new images' shifts, then the replayed ones' (sharded alike)
            shifts = draw_shift(z_key, iteration)
            extras += (shifts[..., :config.batch_size, :],) + (
                (shifts[..., config.batch_size:, :],) if stabilisers.replay else ())
        generator, student, metrics, *memory = sharded(
            state.generator, state.student, teacher_variables, draw(z_key, iteration), *extras)
        return ZeroShotState(generator, student, *memory), metrics

    return jax.jit(iteration_fn, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------
# The job: python run.py --config=configs/svhn.py --workdir=...

# A checkpoint written before the stabilisers (or config.method) existed ran the paper's loop:
# it resumes into a run whose stabilisers are all off and that names no method.
RESUME_DEFAULTS = dict(Stabilisers()._asdict(), method='')


def num_seeds(config) -> int:
    k = config.num_seeds
    if k < 1:
        raise ConfigError(f'config.num_seeds = {k}; it must be at least 1')
    return k


def seeds_of(config):
    """The seeds a run trains: config.seed, config.seed + 1, ..., one per generator/student pair."""
    return [config.seed + i for i in range(num_seeds(config))]


def create_states(config, models: Models, mesh):
    """A fresh ``ZeroShotState`` (replicated; an empty replay memory if replay is on), and the
    key of the z stream.

    Seed s gives the same states and z stream whether it is trained alone or among
    ``num_seeds`` pairs (then stacked along a leading seed axis).
    """
    from zskt_jax import data
    from zskt_jax.state import adam, create_state
    info = data.dataset_info(config.dataset)
    tx = adam(config.grad_clip, config.adam_b1, config.adam_b2, config.adam_eps)

    def for_seed(seed):
        generator_key, student_key, z_key = jax.random.split(jax.random.key(seed), 3)
        generator = create_state(models.generator, generator_key,
                                 jnp.zeros((2, config.generator.z_dim)), tx)
        student = create_state(models.student, student_key, jnp.zeros((2,) + info.image_shape), tx)
        replay_size = Stabilisers.from_config(config).replay_size
        replay = (np.zeros((replay_size,) + info.image_shape, np.float32) if replay_size
                  else None)
        return ZeroShotState(generator, student, replay), z_key

    per_seed = [for_seed(seed) for seed in seeds_of(config)]
    state, z_key = per_seed[0] if len(per_seed) == 1 else jax.tree.map(
        lambda *xs: jnp.stack(xs), *per_seed)
    return parallel.replicate(state, mesh), z_key


def _read_metrics(metrics) -> Dict[str, float]:
    # One scalar per seed; with several seeds the logged value is their mean (a NaN in any seed
    # makes it NaN).
    return {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()
            if np.ndim(v) == np.ndim(metrics['student_loss'])}


def make_evaluate(config, setup: Distillation, run, teacher_accuracy: float, seeds, z_key):
    """``evaluate(iteration, state)``: the student's test accuracy (each seed's), per class and
    the classes it never predicts, into the run's history, TensorBoard and the log, with a grid of
    the first seed's generated images."""
    from zskt_jax import common, reporting
    info, models = setup.info, setup.models
    evaluator = common.Evaluator(models.student, config.dataset, *setup.eval_split,
                                 config.eval_batch_size, setup.mesh)
    seed_slice = (lambda tree, i: tree) if len(seeds) == 1 else (
        lambda tree, i: jax.tree.map(lambda x: x[i], tree))
    sample_z = jax.random.normal(jax.random.fold_in(seed_slice(z_key, 0), 2**32 - 1),
                                 (32, config.generator.z_dim))
    draw_samples = jax.jit(lambda g: models.generator.apply(
        {'params': g.params, 'batch_stats': g.batch_stats}, sample_z, train=False))

    def evaluate(iteration, state):
        counts = [evaluator.counts({'params': seed_slice(state.student.params, i),
                                    'batch_stats': seed_slice(state.student.batch_stats, i)})
                  for i in range(len(seeds))]
        accuracies = [c.accuracy for c in counts]
        accuracy, elapsed = float(np.mean(accuracies)), run.clock()  # time to accuracy
        # Per-class accuracy, and the classes the student never predicts: a stalled run (one
        # whose generator never made it learn a class) shows here, not in the training losses.
        per_class = [c.recall() for c in counts]
        never = [c.never_predicted() for c in counts]
        entry = {'iteration': iteration, 'student_accuracy': accuracy, 'wall_time_s': elapsed}
        scalars = {'eval/student_accuracy': accuracy, 'eval/teacher_accuracy': teacher_accuracy,
                   'eval/wall_time_s': elapsed}
        if len(seeds) == 1:
            entry.update(per_class_accuracy=per_class[0], classes_never_predicted=never[0])
            scalars['eval/classes_never_predicted'] = len(never[0])
        else:
            entry.update(student_accuracy_per_seed=accuracies,
                         per_class_accuracy_per_seed=per_class,
                         classes_never_predicted_per_seed=never)
            for s, a, n in zip(seeds, accuracies, never):
                scalars.update({f'eval/student_accuracy_seed{s}': a,
                                f'eval/classes_never_predicted_seed{s}': len(n)})
        run.history.append(entry)
        run.writer.write_scalars(iteration, scalars)
        run.writer.write_images(iteration, {'generated': reporting.image_grid(
            np.asarray(jax.device_get(draw_samples(seed_slice(state.generator, 0)))), info.mean,
            info.std)[None]})
        run.writer.flush()
        stalled = [('' if len(seeds) == 1 else f'seed {s} ') + 'never predicts class '
                   + ', '.join(map(str, n)) for s, n in zip(seeds, never) if n]
        logger.info('[%d/%d] student test accuracy %s (teacher %.2f%%)%s', iteration,
                    config.num_iterations, ', '.join(f'{100 * a:.2f}%' for a in accuracies),
                    100 * teacher_accuracy, ''.join('; ' + line for line in stalled))

    return evaluate


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
    """Distil the teacher into the student with no data; returns the results written to
    ``{workdir}/results.json``."""
    from zskt_jax import common, loop, reporting
    setup = common.resolve_distillation(config)
    teacher_variables, teacher_path = setup.teacher_variables, setup.teacher_path
    state, z_key = create_states(config, setup.models, setup.mesh)
    run = loop.RunDir(workdir, config, defaults=RESUME_DEFAULTS,
                      validate_meta=checkpoints.same_teacher_as(setup.teacher_meta, teacher_path))
    run.record = {'teacher_path': teacher_path,
                  'teacher_checksum': setup.teacher_meta['checksum']}
    start, saved, _ = run.restore(state.state_dict())
    state = state if saved is None else state.replace_from(saved)

    teacher_accuracy = setup.teacher_accuracy(config)
    seeds = seeds_of(config)
    if len(seeds) > 1 and jax.default_backend() == 'cpu':
        logger.warning('config.num_seeds = %d on CPU: XLA:CPU runs the vmapped convolutions '
                       'slowly (3 seeds took 3.7x as long as 3 single-seed runs, '
                       'docs/performance.md); scripts/seeds.py runs the seeds one after '
                       'another.', len(seeds))
    evaluate = make_evaluate(config, setup, run, teacher_accuracy, seeds, z_key)
    iteration_fn = make_iteration_fn(setup.models, config, setup.mesh, donate=True)
    progress = reporting.Progress(start, config.num_iterations)
    shown = ('generator_loss', 'student_loss', config.adversarial_loss, 'attention', 'agreement')

    def log(done, metrics):
        logger.info(progress.line(done, {k: metrics[k] for k in shown}))
        run.writer.write_scalars(done, {f'train/{k}': v for k, v in metrics.items()})

    end = loop.train_loop(
        lambda state, i: iteration_fn(state, teacher_variables, z_key), state, start,
        config.num_iterations, loop.Cadence.of(config),
        run=run, state_dict=lambda state: state.state_dict(), read_metrics=_read_metrics,
        log=log, evaluate=evaluate, progress=progress,
        non_finite_hint='lower the learning rates or check the teacher')
    if end.stopped_at is not None:
        return run.stopped('zero_shot', end.stopped_at)
    if not run.history or run.history[-1]['iteration'] != config.num_iterations:
        evaluate(config.num_iterations, end.state)  # resumed from the last checkpoint
    final = run.history[-1]
    results = {
        'job': 'zero_shot',
        # The FINAL iterate is the reported result (docs/method.md, section "Evaluation"), not
        # the best.
        'student_accuracy': final['student_accuracy'],  # mean over seeds
        'teacher_accuracy': teacher_accuracy, 'iterations': config.num_iterations,
        'final_train_metrics': end.metrics, 'seeds': seeds, 'teacher_path': teacher_path,
    }
    if len(seeds) > 1:
        results['student_accuracy_per_seed'] = final['student_accuracy_per_seed']
        # population std (ddof=0)
        results['student_accuracy_std'] = float(np.std(final['student_accuracy_per_seed']))
    path = run.finish(results)
    if path:
        logger.info('Student %.2f%%, teacher %.2f%% (%.1f%% of the teacher); results in %s',
                    100 * results['student_accuracy'], 100 * teacher_accuracy,
                    100 * results['student_accuracy'] / max(teacher_accuracy, 1e-9), path)
    return results
