"""Pure-functional train states for the generator and the student, their creation, and the
zero-shot job's state (both of them and the replay memory) with its saved form.

The teacher's variables are never part of a state: they are an argument of the step, frozen.
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    """params, batch statistics, optimizer state and the number of completed iterations.

    ``step`` counts ITERATIONS (not optimizer updates): the learning rate of every update of an
    iteration is a function of it, so the cosine schedule is stepped once per iteration
    (docs/method.md, section "One iteration (Algorithm 1)", step 4). Adam keeps its own update
    count for bias correction.
    """
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def apply_gradients(self, grads, learning_rate, batch_stats):
        """One optimizer update: the transformation (clipping, Adam/SGD moments) then -lr * u."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        updates = jax.tree.map(lambda u: -learning_rate * u, updates)
        params = optax.apply_updates(self.params, updates)
        return self.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)

    def state_dict(self):
        """The saved form (everything but the static transformation)."""
        return {'step': self.step, 'params': self.params, 'batch_stats': self.batch_stats,
                'opt_state': self.opt_state}

    def replace_from(self, saved):
        return self.replace(step=saved['step'], params=saved['params'],
                            batch_stats=saved['batch_stats'], opt_state=saved['opt_state'])


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


def adam(clip_norm: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """Clip to global L2 norm, then Adam's direction; the learning rate is applied by the state.

    Same order as the authors' ``clip_grad_norm_`` then ``Adam.step`` (no weight decay).
    """
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    return optax.chain(*parts, optax.scale_by_adam(b1=b1, b2=b2, eps=eps))


def sgd(momentum: float, weight_decay: float, nesterov: bool = False):
    """PyTorch SGD: weight decay is added to the gradient before momentum (coupled L2)."""
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.trace(decay=momentum, nesterov=nesterov))


def init_variables(module, init_key, sample_input, **apply_kwargs):
    """``module.init`` compiled once without XLA's backend optimisations: initialisation runs a
    single time, and on a 2-core CPU this takes 5 s instead of 20 s eagerly or 28 s optimised
    (WRN-16-1). The values are the same draws up to float rounding of the distributions."""
    init = jax.jit(lambda key, x: module.init(key, x, **apply_kwargs),
                   compiler_options={'xla_backend_optimization_level': 0})
    return init(init_key, sample_input)


def create_state(module, init_key, sample_input, tx, **apply_kwargs) -> TrainState:
    """Initialise ``module`` on ``sample_input`` and wrap it with a fresh optimizer state."""
    variables = init_variables(module, init_key, sample_input, **apply_kwargs)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params),
                      tx=tx)


def cosine_learning_rate(base_lr: float, iteration, num_iterations: int):
    """lr_k = lr_0 * 0.5 * (1 + cos(pi * k / N)), k the iteration index (docs/method.md)."""
    progress = jnp.asarray(iteration, jnp.float32) / num_iterations
    return base_lr * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
