"""Zero-shot knowledge transfer: the compiled iteration (Algorithm 1) and the training job."""
import functools
import logging
import os
from typing import Any, Callable, Dict, NamedTuple

import flax.struct
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from zskt_jax import checkpoints, losses, parallel, paths
from zskt_jax.errors import ConfigError, NonFiniteLossError  # noqa: F401 (raised by the loop)
from zskt_jax.models.layers import INPUT_MOMENTS
from zskt_jax.parallel import DATA_AXIS, data_parallel
from zskt_jax.state import TrainState, cosine_learning_rate

logger = logging.getLogger('zskt_jax')


class Models(NamedTuple):
    """The three networks as built for training (BatchNorms averaging over the ``data`` axis)."""
    generator: Any
    student: Any
    teacher: Any


class Stabilisers(NamedTuple):
    """The terms that the data-free methods after ZSKT add to its loop (docs/method.md, section
    "Stabilisers"), read from the config. The defaults are the paper's loop: nothing added, nothing
    traced. Each weight scales a term of the GENERATOR's loss; replay changes the student's batch.
    """
    adversarial_loss: str = 'kl'    # D(T, S) of both players: 'kl' (ZSKT) | 'l1' (DFAD)
    bn_weight: float = 0.0          # DeepInversion / DFQ / CMI: teacher BN input statistics
    balance_weight: float = 0.0     # DAFL: negative entropy of the batch-mean teacher softmax
    one_hot_weight: float = 0.0     # DAFL / DFQ: teacher cross-entropy against its own argmax
    replay_size: int = 0            # CMI's image pool: generated images kept (0 = off)
    replay_batch: int = 0           # images drawn from it into every student batch

    @classmethod
    def from_config(cls, config) -> 'Stabilisers':
        stabilisers = cls(**{field: config[field] for field in cls._fields})
        losses.adversarial_discrepancy(stabilisers.adversarial_loss)  # a clear error if unknown
        for field in ('bn_weight', 'balance_weight', 'one_hot_weight', 'replay_size',
                      'replay_batch'):
            if getattr(stabilisers, field) < 0:
                raise ConfigError(f'config.{field} = {getattr(stabilisers, field)}; it must be '
                                 '>= 0 (0 turns it off)')
        if (stabilisers.replay_size > 0) != (stabilisers.replay_batch > 0):
            raise ConfigError(f'config.replay_size = {stabilisers.replay_size} and '
                             f'config.replay_batch = {stabilisers.replay_batch}: set both (replay '
                             'on) or neither (off)')
        if stabilisers.replay_size % config.batch_size:
            raise ConfigError(f'config.replay_size = {stabilisers.replay_size} must be a multiple '
                             f'of config.batch_size = {config.batch_size}: every iteration writes '
                             'one whole batch into the memory')
        return stabilisers

    @property
    def replay(self) -> bool:
        return self.replay_size > 0


@flax.struct.dataclass
class ZeroShotState:
    """Everything a zero-shot run trains and carries from one iteration to the next.

    ``replay``: [replay_size, H, W, C] float32, the generated images of past iterations (a ring
    buffer: iteration k writes its batch at rows (k mod (replay_size / B)) * B ...), or None
    when replay is off. It is state like the networks': checkpointed, restored, replicated.
    """
    generator: TrainState
    student: TrainState
    replay: Any = None

    def state_dict(self):
        saved = {'generator': self.generator.state_dict(), 'student': self.student.state_dict()}
        if self.replay is not None:
            saved['replay'] = self.replay
        return saved

    def replace_from(self, saved):
        return self.replace(generator=self.generator.replace_from(saved['generator']),
                            student=self.student.replace_from(saved['student']),
                            replay=saved.get('replay'))


def _pmean(x):
    return jax.lax.pmean(x, DATA_AXIS)


def _max_probability(logits):
    return jnp.mean(jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1))


def repeat(update: Callable, carry, length: int, unroll: bool):
    """``lax.scan(update, carry, None, length)``, or the same updates traced one after another.

    Either way the iteration is ONE compiled function. Unrolling exists for XLA:CPU, which
    leaves the weight-gradient convolutions inside a while loop in a slow generic form: measured
    on a 2-core CPU, the digits iteration took 5.4 s as a scan and 0.39 s unrolled.
    """
    if not unroll:
        return jax.lax.scan(lambda c, _: update(c, None), carry, None, length=length)
    outputs = []
    for _ in range(length):
        carry, output = update(carry, None)
        outputs.append(output)
    return carry, jax.tree.map(lambda *xs: jnp.stack(xs), *outputs)


def use_unrolled_loops(config) -> bool:
    """config.update_loop: 'scan' | 'unroll' | 'auto' (unroll on CPU, where scans are slow)."""
    mode = config.update_loop
    if mode not in ('auto', 'scan', 'unroll'):
        raise ConfigError(f"config.update_loop = {mode!r}; choose 'auto', 'scan' or 'unroll'")
    return mode == 'unroll' or (mode == 'auto' and jax.default_backend() == 'cpu')


def _bn_layers(input_moments, batch_stats):
    """The sown input moments and the running statistics of the same BatchNorms, keyed by the
    layer's path: ({path: (mean, var)}, {path: (running_mean, running_var)})."""
    sown = flax.traverse_util.flatten_dict(input_moments)     # {(..., 'moments'): ((m, v),)}
    running = flax.traverse_util.flatten_dict(batch_stats)    # {(..., 'mean' | 'var'): [C]}
    moments = {path[:-1]: value[0] for path, value in sown.items()}
    return moments, {layer: (running[layer + ('mean',)], running[layer + ('var',)])
                     for layer in moments}


def make_iteration_body(models: Models, *, n_generator_steps: int, n_student_steps: int,
                        beta: float, num_iterations: int, generator_lr: float,
                        student_lr: float, unroll: bool = False,
                        stabilisers: Stabilisers = Stabilisers()) -> Callable:
    """Per-device body of one iteration: n_g generator updates, then n_s student updates.

    (generator, student, teacher_variables, z [B_local, z_dim]) -> (generator, student, metrics).
    With replay on (``stabilisers.replay``) the body also takes the memory (replicated) and this
    device's rows of the iteration's replay indices, and returns the updated memory:
    (..., z, memory, replay_indices [R_local]) -> (generator, student, metrics, memory).
    Losses are ``pmean``-ed over the ``data`` axis before differentiation, so gradients are the
    global-batch average whatever the device count (the gradient of each device's own loss,
    summed by shard_map, would be multiplied by the device count).
    ``unroll``: trace the n_g and n_s updates one after another instead of as a ``lax.scan``
    (see ``repeat``); the result is the same. Stabilisers with weight 0 are not traced at all.
    """
    discrepancy = losses.adversarial_discrepancy(stabilisers.adversarial_loss)
    # The metrics name the discrepancy: 'kl' for the paper's loop, 'l1' for DFAD's.
    name = stabilisers.adversarial_loss

    def teacher_forward(teacher_variables, x):
        # Inference-mode BatchNorm; the teacher's variables are closed over, never differentiated.
        return models.teacher.apply(teacher_variables, x, train=False)

    def teacher_forward_with_moments(teacher_variables, x):
        # The same forward pass, also returning the batch moments of every BatchNorm's input.
        outputs, sown = models.teacher.apply(teacher_variables, x, train=False,
                                             mutable=[INPUT_MOMENTS])
        return outputs, sown[INPUT_MOMENTS]

    def student_forward(params, batch_stats, x):
        # Training-mode BatchNorm: its running statistics move at every forward (docs/method.md).
        (logits, activations), updated = models.student.apply(
            {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'])
        return logits, activations, updated['batch_stats']

    def generate(params, batch_stats, z):
        images, updated = models.generator.apply(
            {'params': params, 'batch_stats': batch_stats}, z, train=True, mutable=['batch_stats'])
        return images, updated['batch_stats']

    def stabiliser_terms(teacher_variables, teacher_logits, input_moments):
        """The generator-loss terms of the later methods that are on: {name: (weight, value)},
        each already the whole-batch value (identical on every device)."""
        terms = {}
        if stabilisers.bn_weight:
            moments, running = _bn_layers(input_moments, teacher_variables['batch_stats'])
            terms['bn_statistics'] = (stabilisers.bn_weight,
                                      losses.bn_statistics_loss(moments, running))
        if stabilisers.balance_weight:
            mean_probabilities = _pmean(jnp.mean(jax.nn.softmax(teacher_logits, -1), axis=0))
            terms['class_balance'] = (stabilisers.balance_weight,
                                      losses.class_balance_loss(mean_probabilities))
        if stabilisers.one_hot_weight:
            terms['one_hot'] = (stabilisers.one_hot_weight,
                                _pmean(losses.one_hot_loss(teacher_logits)))
        return terms

    def body(generator: TrainState, student: TrainState, teacher_variables, z, *replay):
        iteration = student.step
        lr_g = cosine_learning_rate(generator_lr, iteration, num_iterations)
        lr_s = cosine_learning_rate(student_lr, iteration, num_iterations)

        # Step 2: the generator maximises KL(T(x) || S(x)); gradients reach only G's parameters.
        def generator_update(carry, _):
            generator, student_stats = carry

            def loss_fn(params):
                images, gen_stats = generate(params, generator.batch_stats, z)
                if stabilisers.bn_weight:
                    (teacher_logits, _), input_moments = teacher_forward_with_moments(
                        teacher_variables, images)
                else:
                    (teacher_logits, _), input_moments = teacher_forward(
                        teacher_variables, images), None
                student_logits, _, student_stats_new = student_forward(
                    student.params, student_stats, images)
                loss = _pmean(losses.generator_loss(teacher_logits, student_logits, discrepancy))
                terms = stabiliser_terms(teacher_variables, teacher_logits, input_moments)
                adversarial = loss
                for weight, value in terms.values():
                    loss = loss + weight * value
                return loss, (gen_stats, student_stats_new, adversarial,
                              {k: value for k, (_, value) in terms.items()})

            (loss, (gen_stats, student_stats, adversarial, terms)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(generator.params)
            outputs = {'generator_loss': loss}
            if terms:
                outputs.update(terms, generator_adversarial=adversarial)
            return (generator.apply_gradients(grads, lr_g, gen_stats), student_stats), outputs

        (generator, student_stats), generator_outputs = repeat(
            generator_update, (generator, student.batch_stats), n_generator_steps, unroll)
        student = student.replace(batch_stats=student_stats)

        # Step 3: G is fixed during the student updates, so the images and the teacher's outputs
        # are computed once per iteration; this is exactly what re-running them would give.
        images, gen_stats = generate(generator.params, generator.batch_stats, z)
        generator = generator.replace(batch_stats=gen_stats)
        images = jax.lax.stop_gradient(images)
        if stabilisers.replay:
            # CMI's image pool: this iteration's whole batch goes into the memory, then the
            # student's batch is the new images plus this device's rows of the replayed ones.
            memory, replay_indices = replay
            # 'invarying': the gathered batch is the same on every device, as the memory is.
            batch = jax.lax.all_gather(images, DATA_AXIS, axis=0, tiled=True,
                                       to='invarying')  # [B, H, W, C]
            slot = (iteration % (memory.shape[0] // batch.shape[0])) * batch.shape[0]
            memory = jax.lax.dynamic_update_slice_in_dim(memory, batch, slot, axis=0)
            images = jnp.concatenate([images, memory[replay_indices]], axis=0)
        teacher_logits, teacher_activations = teacher_forward(teacher_variables, images)

        def student_update(student, _):
            def loss_fn(params):
                student_logits, student_activations, stats = student_forward(
                    params, student.batch_stats, images)
                loss, kl, at = losses.student_loss(teacher_logits, student_logits,
                                                   teacher_activations, student_activations, beta,
                                                   discrepancy)
                return _pmean(loss), (stats, kl, at, student_logits)

            (loss, (stats, kl, at, student_logits)), grads = jax.value_and_grad(
                loss_fn, has_aux=True)(student.params)
            student = student.apply_gradients(grads, lr_s, stats)
            agreement = jnp.mean(jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
            return student, {'student_loss': loss, 'kl': _pmean(kl), 'attention': _pmean(at),
                             'student_lr': lr_s,
                             'student_max_prob': _pmean(_max_probability(student_logits)),
                             'agreement': _pmean(agreement.astype(jnp.float32))}

        student, student_metrics = repeat(student_update, student, n_student_steps, unroll)
        metrics = {
            # The generator's last update (and, with stabilisers, each of its loss terms).
            **{k: v[-1] for k, v in generator_outputs.items()},
            # The student metrics of the first update describe the images as the generator left
            # them; those of the last show how far the n_s updates closed the gap.
            'student_loss': student_metrics['student_loss'][-1],
            f'{name}_before_student_updates': student_metrics['kl'][0],
            name: student_metrics['kl'][-1],
            'attention': student_metrics['attention'][-1],
            'student_max_prob': student_metrics['student_max_prob'][-1],
            'agreement': student_metrics['agreement'][-1],
            'teacher_max_prob': _pmean(_max_probability(teacher_logits)),
            'generator_lr': lr_g,
            'student_lr': lr_s,
            # The learning rate each of the n_s updates applied: constant within an iteration.
            'student_lr_per_update': student_metrics['student_lr'],
        }
        outputs = (generator.replace(step=generator.step + 1),
                   student.replace(step=student.step + 1), metrics)
        return outputs + ((memory,) if stabilisers.replay else ())

    return body


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


def make_iteration_fn(models: Models, config, mesh, donate: bool = False) -> Callable:
    """The compiled iteration: (state, teacher_variables, z_key) -> (state, metrics).

    ``donate``: the input state's buffers are reused for the output (the caller must not read
    the state it passed in again).

    jit(shard_map(body)): states, the replay memory and the teacher replicated, the z batch (and
    the replay draw) sharded over ``data``. With ``config.num_seeds = k > 1`` the states, keys
    and metrics carry a leading seed axis and the body is vmapped over it: k independent
    generator/student pairs, one teacher, one program.
    """
    stabilisers = Stabilisers.from_config(config)
    body = make_iteration_body(
        models, n_generator_steps=config.n_g, n_student_steps=config.n_s, beta=config.beta,
        num_iterations=config.num_iterations, generator_lr=config.generator_lr,
        student_lr=config.student_lr, unroll=use_unrolled_loops(config), stabilisers=stabilisers)
    draw = functools.partial(draw_z, batch_size=config.batch_size, z_dim=config.generator.z_dim)
    draw_replay = functools.partial(draw_replay_indices, batch_size=config.batch_size,
                                    replay_size=stabilisers.replay_size,
                                    replay_batch=stabilisers.replay_batch)
    parallel.check_divisible(stabilisers.replay_batch, mesh, 'replay_batch')
    replay_args = 2 if stabilisers.replay else 0
    if num_seeds(config) == 1:
        z_spec = P(DATA_AXIS)                                     # z: [B, z_dim]
    else:
        body = jax.vmap(body, in_axes=(0, 0, None, 0) + (0,) * replay_args)
        draw, draw_replay = jax.vmap(draw), jax.vmap(draw_replay)
        z_spec = P(None, DATA_AXIS)                               # z: [seeds, B, z_dim]
    # The memory is replicated, the replay draw sharded like z.
    replay_specs = (P(), z_spec)[:replay_args]
    sharded = data_parallel(body, mesh, in_specs=(P(), P(), P(), z_spec) + replay_specs,
                            out_specs=(P(), P(), P()) + replay_specs[:1])

    def iteration_fn(state: ZeroShotState, teacher_variables, z_key):
        iteration = state.student.step
        z = draw(z_key, iteration)
        if not stabilisers.replay:
            generator, student, metrics = sharded(state.generator, state.student,
                                                  teacher_variables, z)
            new_state = ZeroShotState(generator, student)
        else:
            generator, student, metrics, memory = sharded(
                state.generator, state.student, teacher_variables, z, state.replay,
                draw_replay(z_key, iteration))
            new_state = ZeroShotState(generator, student, memory)
        return new_state, metrics

    return jax.jit(iteration_fn, donate_argnums=(0,) if donate else ())


# ----------------------------------------------------------------------------------------------
# The job: python run.py --config=configs/svhn.py --workdir=...

# A checkpoint written before the stabilisers existed ran the paper's loop: it resumes into a
# run whose stabilisers are all off.
RESUME_DEFAULTS = Stabilisers()._asdict()


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
    from zskt_jax import data, parallel
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


def make_evaluate(config, models: Models, mesh, run, eval_split, teacher_accuracy: float, seeds,
                  z_key):
    """``evaluate(iteration, state)``: the student's test accuracy (each seed's), per class and
    the classes it never predicts, into the run's history, TensorBoard and the log, with a grid of
    the first seed's generated images."""
    from zskt_jax import common, data, reporting
    info = data.dataset_info(config.dataset)
    evaluator = common.Evaluator(models.student, config.dataset, *eval_split,
                                 config.eval_batch_size, mesh)
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
    info, mesh, teacher_variables, teacher_meta = common.distillation_setup(config)
    models = Models(generator=common.build_generator(config),
                    student=common.build_network(config.student, info.num_classes, config),
                    teacher=common.build_network(config.teacher, info.num_classes, config))
    state, z_key = create_states(config, models, mesh)
    teacher_path = paths.absolute(common.teacher_dir(config))
    run = loop.RunDir(workdir, config, defaults=RESUME_DEFAULTS,
                      validate_meta=checkpoints.same_teacher_as(teacher_meta, teacher_path))
    run.record = {'teacher_path': teacher_path, 'teacher_checksum': teacher_meta['checksum']}
    start, saved, _ = run.restore(state.state_dict())
    state = state if saved is None else state.replace_from(saved)

    eval_split = common.load_eval_split(config)
    teacher_accuracy = common.teacher_accuracy(config, models.teacher, teacher_variables,
                                               *eval_split, mesh)
    seeds = seeds_of(config)
    if len(seeds) > 1 and jax.default_backend() == 'cpu':
        logger.warning('config.num_seeds = %d on CPU: XLA:CPU runs the vmapped convolutions '
                       'slowly (3 seeds took 3.7x as long as 3 single-seed runs, '
                       'docs/performance.md); scripts/seeds.py runs the seeds one after '
                       'another.', len(seeds))
    evaluate = make_evaluate(config, models, mesh, run, eval_split, teacher_accuracy, seeds,
                             z_key)
    iteration_fn = make_iteration_fn(models, config, mesh, donate=True)
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
