"""One zero-shot iteration on one device (docs/method.md, section "One iteration (Algorithm 1)"):
n_g generator updates, the iteration's images (and, with replay on, the replay memory), n_s
student updates; and the sharding of that body over the ``data`` mesh (and the seeds).

Read ``make_iteration_body``'s ``body`` first: it composes the named steps below top to bottom.
Everything here is per-device code traced into ONE compiled function; the key streams and the jit
are the job's (``zero_shot.make_iteration_fn``).
"""
from typing import Callable, NamedTuple

import flax.traverse_util
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from zskt_jax import losses, validation
from zskt_jax.common import Models
from zskt_jax.errors import ConfigError
from zskt_jax.models.layers import INPUT_MOMENTS
from zskt_jax.parallel import DATA_AXIS, data_parallel
from zskt_jax.state import TrainState, cosine_learning_rate


class Stabilisers(NamedTuple):
    """The terms that the data-free methods after ZSKT add to its loop (docs/method.md, section
    "Stabilisers"), read from the config. The defaults are the paper's loop: nothing added, nothing
    traced. Each weight scales a term of the GENERATOR's loss; replay and student_augment change
    the student's batch.
    """
    adversarial_loss: str = 'kl'    # D(T, S) of both players: 'kl' (ZSKT) | 'l1' (DFAD)
    bn_weight: float = 0.0          # DeepInversion / DFQ / CMI: teacher BN input statistics
    balance_weight: float = 0.0     # DAFL: negative entropy of the batch-mean teacher softmax
    one_hot_weight: float = 0.0     # DAFL / DFQ: teacher cross-entropy against its own argmax
    replay_size: int = 0            # CMI's image pool: generated images kept (0 = off)
    replay_batch: int = 0           # images drawn from it into every student batch
    student_augment: str = 'none'   # 'crop': the student's images shifted at random (CMI's pool)

    @classmethod
    def from_config(cls, config) -> 'Stabilisers':
        stabilisers = cls(**{field: config[field] for field in cls._fields})
        losses.adversarial_discrepancy(stabilisers.adversarial_loss)  # a clear error if unknown
        if stabilisers.student_augment not in validation.STUDENT_AUGMENTS:
            raise ConfigError(f'config.student_augment = {stabilisers.student_augment!r}; choose '
                              f'{" or ".join(map(repr, validation.STUDENT_AUGMENTS))}')
        for field in ('bn_weight', 'balance_weight', 'one_hot_weight', 'replay_size',
                      'replay_batch'):
            if getattr(stabilisers, field) < 0:
                raise ConfigError(f'config.{field} = {getattr(stabilisers, field)}; it must be '
                                 '>= 0 (0 turns it off)')
        problems = validation.replay_problems(config)
        if problems:
            raise ConfigError(problems[0])
        return stabilisers

    @property
    def replay(self) -> bool:
        return self.replay_size > 0

    @property
    def shift(self) -> bool:
        return self.student_augment == 'crop'


class Settings(NamedTuple):
    """What one iteration is built from besides its arrays (static: fixed at trace time)."""
    models: Models
    stabilisers: Stabilisers
    discrepancy: Callable           # D(T, S): losses.adversarial_discrepancy of the stabilisers
    n_generator_steps: int
    n_student_steps: int
    beta: float
    num_iterations: int
    generator_lr: float
    student_lr: float
    unroll: bool
    attention_pairs: tuple = None   # (teacher stage, student stage) pairs; None: all, in order


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


# ----------------------------------------------------------------------------------------------
# The three networks' forward passes, in the BatchNorm modes of docs/method.md, section
# "BatchNorm modes"

def teacher_forward(models: Models, teacher_variables, x):
    # Inference-mode BatchNorm; the teacher's variables are closed over, never differentiated.
    return models.teacher.apply(teacher_variables, x, train=False)


def teacher_forward_with_moments(models: Models, teacher_variables, x):
    # The same forward pass, also returning the batch moments of every BatchNorm's input.
    outputs, sown = models.teacher.apply(teacher_variables, x, train=False,
                                         mutable=[INPUT_MOMENTS])
    return outputs, sown[INPUT_MOMENTS]


def student_forward(models: Models, params, batch_stats, x):
    # Training-mode BatchNorm: its running statistics move at every forward (docs/method.md).
    (logits, activations), updated = models.student.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats'])
    return logits, activations, updated['batch_stats']


def generate(models: Models, params, batch_stats, z):
    images, updated = models.generator.apply(
        {'params': params, 'batch_stats': batch_stats}, z, train=True, mutable=['batch_stats'])
    return images, updated['batch_stats']


# ----------------------------------------------------------------------------------------------
# Step 2: the generator updates

def _bn_layers(input_moments, batch_stats):
    """The sown input moments and the running statistics of the same BatchNorms, keyed by the
    layer's path: ({path: (mean, var)}, {path: (running_mean, running_var)})."""
    sown = flax.traverse_util.flatten_dict(input_moments)     # {(..., 'moments'): ((m, v),)}
    running = flax.traverse_util.flatten_dict(batch_stats)    # {(..., 'mean' | 'var'): [C]}
    moments = {path[:-1]: value[0] for path, value in sown.items()}
    return moments, {layer: (running[layer + ('mean',)], running[layer + ('var',)])
                     for layer in moments}


def stabiliser_terms(stabilisers: Stabilisers, teacher_variables, teacher_logits,
                     input_moments):
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


def generator_loss(settings: Settings, params, generator_stats, student_params, student_stats,
                   teacher_variables, z):
    """The generator's loss, -D(T(x), S(x)) plus the stabiliser terms that are on, pmean-ed over
    ``data``; aux: (its BN statistics, the student's, the adversarial part, {term: value})."""
    models, stabilisers = settings.models, settings.stabilisers
    images, gen_stats = generate(models, params, generator_stats, z)
    if stabilisers.bn_weight:
        (teacher_logits, _), input_moments = teacher_forward_with_moments(
            models, teacher_variables, images)
    else:
        (teacher_logits, _), input_moments = teacher_forward(
            models, teacher_variables, images), None
    student_logits, _, student_stats_new = student_forward(
        models, student_params, student_stats, images)
    loss = _pmean(losses.generator_loss(teacher_logits, student_logits, settings.discrepancy))
    terms = stabiliser_terms(stabilisers, teacher_variables, teacher_logits, input_moments)
    adversarial = loss
    for weight, value in terms.values():
        loss = loss + weight * value
    return loss, (gen_stats, student_stats_new, adversarial,
                  {k: value for k, (_, value) in terms.items()})


def generator_updates(settings: Settings, generator: TrainState, student: TrainState,
                      teacher_variables, z, lr):
    """Step 2: n_g updates of the generator, maximising D(T(x) || S(x)); gradients reach only
    G's parameters, but the student's BN statistics move at each of its forward passes.
    Returns (generator, student, {output: [n_g]})."""
    def update(carry, _):
        generator, student_stats = carry
        loss_fn = lambda params: generator_loss(settings, params, generator.batch_stats,
                                                student.params, student_stats,
                                                teacher_variables, z)
        (loss, (gen_stats, student_stats, adversarial, terms)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(generator.params)
        outputs = {'generator_loss': loss}
        if terms:
            outputs.update(terms, generator_adversarial=adversarial)
        return (generator.apply_gradients(grads, lr, gen_stats), student_stats), outputs

    (generator, student_stats), outputs = repeat(
        update, (generator, student.batch_stats), settings.n_generator_steps, settings.unroll)
    return generator, student.replace(batch_stats=student_stats), outputs


# ----------------------------------------------------------------------------------------------
# Step 3: the student's images, the replay memory, the student updates

def fixed_generator_images(settings: Settings, generator: TrainState, z):
    """G is fixed during the student updates, so the images (and the teacher's outputs) are
    computed once per iteration; this is exactly what re-running them would give. Returns
    (images, the generator with the BN statistics of this forward pass)."""
    images, gen_stats = generate(settings.models, generator.params, generator.batch_stats, z)
    generator = generator.replace(batch_stats=gen_stats)
    return jax.lax.stop_gradient(images), generator


def write_replay(memory, images, iteration):
    """CMI's image pool: this iteration's whole batch (gathered over ``data``) goes into the
    memory, at rows (iteration mod (replay_size / B)) * B ... (a ring buffer)."""
    # 'invarying': the gathered batch is the same on every device, as the memory is.
    batch = jax.lax.all_gather(images, DATA_AXIS, axis=0, tiled=True,
                               to='invarying')  # [B, H, W, C]
    slot = (iteration % (memory.shape[0] // batch.shape[0])) * batch.shape[0]
    return jax.lax.dynamic_update_slice_in_dim(memory, batch, slot, axis=0)


def sample_replay(memory, images, replay_indices):
    """The student's batch: this device's new images, then its rows of the replayed ones."""
    return jnp.concatenate([images, memory[replay_indices]], axis=0)


def max_shift(image_size: int) -> int:
    """How far 'crop' shifts an image of this size: H/8 pixels, the teachers' crop (4 at 32x32,
    torchvision's RandomCrop(32, padding=4); 2 at 16x16)."""
    return image_size // 8


def shift_images(images, shifts):
    """Each image [H, W, C] of the batch translated by its (dy, dx) of ``shifts`` [N, 2], both in
    [-max_shift(H), max_shift(H)]; the pixels moved in repeat the border (the generated images
    have no black to pad with: they live in the teacher's normalised input space)."""
    _, h, w, c = images.shape
    pad = max_shift(h)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='edge')
    return jax.vmap(lambda image, shift: jax.lax.dynamic_slice(
        image, (pad + shift[0], pad + shift[1], 0), (h, w, c)))(padded, shifts)


def student_updates(settings: Settings, student: TrainState, images, teacher_logits,
                    teacher_activations, lr):
    """n_s updates of the student on the same images: D(T, S) + beta * attention, pmean-ed.
    Returns (student, {metric: [n_s]})."""
    def update(student, _):
        def loss_fn(params):
            student_logits, student_activations, stats = student_forward(
                settings.models, params, student.batch_stats, images)
            teacher_stages, student_stages = losses.paired_stages(
                teacher_activations, student_activations, settings.attention_pairs)
            loss, kl, at = losses.student_loss(teacher_logits, student_logits, teacher_stages,
                                               student_stages, settings.beta,
                                               settings.discrepancy)
            return _pmean(loss), (stats, kl, at, student_logits)

        (loss, (stats, kl, at, student_logits)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(student.params)
        student = student.apply_gradients(grads, lr, stats)
        agreement = jnp.mean(jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1))
        return student, {'student_loss': loss, 'kl': _pmean(kl), 'attention': _pmean(at),
                         'student_lr': lr,
                         'student_max_prob': _pmean(_max_probability(student_logits)),
                         'agreement': _pmean(agreement.astype(jnp.float32))}

    return repeat(update, student, settings.n_student_steps, settings.unroll)


def iteration_metrics(name: str, generator_outputs, student_metrics, teacher_logits, lr_g,
                      lr_s):
    """The iteration's metrics; ``name`` is the discrepancy's ('kl' or 'l1')."""
    return {
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


# ----------------------------------------------------------------------------------------------
# The iteration

def make_iteration_body(models: Models, *, n_generator_steps: int, n_student_steps: int,
                        beta: float, num_iterations: int, generator_lr: float,
                        student_lr: float, unroll: bool = False,
                        stabilisers: Stabilisers = Stabilisers(),
                        attention_pairs=None) -> Callable:
    """Per-device body of one iteration: n_g generator updates, then n_s student updates.

    (generator, student, teacher_variables, z [B_local, z_dim]) -> (generator, student, metrics).
    With replay on (``stabilisers.replay``) the body also takes the memory (replicated) and this
    device's rows of the iteration's replay indices, and returns the updated memory:
    (..., z, memory, replay_indices [R_local]) -> (generator, student, metrics, memory).
    With ``student_augment = 'crop'`` it takes, last, this device's rows of the shifts of the new
    images [B_local, 2] (and, with replay, of the replayed ones [R_local, 2]).
    Losses are ``pmean``-ed over the ``data`` axis before differentiation, so gradients are the
    global-batch average whatever the device count (the gradient of each device's own loss,
    summed by shard_map, would be multiplied by the device count).
    ``unroll``: trace the n_g and n_s updates one after another instead of as a ``lax.scan``
    (see ``repeat``); the result is the same. Stabilisers with weight 0 are not traced at all.
    ``attention_pairs``: the (teacher stage, student stage) pairs attention transfer compares
    (``common.attention_pairs``); None compares every stage in order.
    """
    settings = Settings(
        models, stabilisers, losses.adversarial_discrepancy(stabilisers.adversarial_loss),
        n_generator_steps, n_student_steps, beta, num_iterations, generator_lr, student_lr,
        unroll, attention_pairs)

    def body(generator: TrainState, student: TrainState, teacher_variables, z, *extras):
        iteration = student.step
        lr_g = cosine_learning_rate(generator_lr, iteration, num_iterations)
        lr_s = cosine_learning_rate(student_lr, iteration, num_iterations)
        generator, student, generator_outputs = generator_updates(
            settings, generator, student, teacher_variables, z, lr_g)
        images, generator = fixed_generator_images(settings, generator, z)
        if stabilisers.replay:
            memory, replay_indices, *extras = extras
            memory = write_replay(memory, images, iteration)
            images = sample_replay(memory, images, replay_indices)
        if stabilisers.shift:  # the memory keeps the images as generated
            images = shift_images(images, jnp.concatenate(extras, axis=0))
        teacher_logits, teacher_activations = teacher_forward(models, teacher_variables, images)
        student, student_metrics = student_updates(settings, student, images, teacher_logits,
                                                   teacher_activations, lr_s)
        # The metrics name the discrepancy: 'kl' for the paper's loop, 'l1' for DFAD's.
        metrics = iteration_metrics(stabilisers.adversarial_loss, generator_outputs,
                                    student_metrics, teacher_logits, lr_g, lr_s)
        outputs = (generator.replace(step=generator.step + 1),
                   student.replace(step=student.step + 1), metrics)
        return outputs + ((memory,) if stabilisers.replay else ())

    return body


def shard_body(body: Callable, mesh, *, num_seeds: int, replay: bool,
               shift: bool = False) -> Callable:
    """shard_map(body) over ``data``: states, the replay memory and the teacher replicated, the z
    batch (and the replay draw, the shifts) sharded. With ``num_seeds`` > 1 the states, z (and
    memory, draw, shifts) carry a leading seed axis and the body is vmapped over it (one
    teacher)."""
    z_spec = P(DATA_AXIS) if num_seeds == 1 else P(None, DATA_AXIS)  # z: [(seeds,) B, z_dim]
    # The memory is replicated; the replay draw and the shifts are sharded like z.
    extra_specs = ((P(), z_spec) if replay else ()) + ((z_spec,) * (1 + replay) if shift else ())
    if num_seeds > 1:
        body = jax.vmap(body, in_axes=(0, 0, None, 0) + (0,) * len(extra_specs))
    return data_parallel(body, mesh, in_specs=(P(), P(), P(), z_spec) + extra_specs,
                         out_specs=(P(), P(), P()) + ((P(),) if replay else ()))
