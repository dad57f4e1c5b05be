"""Golden values of the paper's zero-shot iteration, recorded with the code before the
stabilisers were added (commit 2e44447), so that the paper's iteration provably stays as it was
(tests/test_stabilisers.py compares against them).

    python tests/golden_iteration.py        # rewrites tests/golden/paper_iteration.npz

Only rerun it on purpose: the file is what the test compares against. Everything the
iteration sees is pinned here (sizes, learning rates, the teacher), not taken from a config file
that may change: 32x32 inputs, WRN-10-1 (base 4) teacher and student, generator hidden 8, batch
16, n_s 2, two iterations.
"""
import os
import sys

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
GOLDEN = os.path.join(TESTS_DIR, 'golden', 'paper_iteration.npz')
ITERATIONS = 2


def paper_config(**overrides):
    """configs/default.py (the paper's loop, every stabiliser off) at the tiny sizes."""
    from configs import default
    config = default.get_config()
    config.dataset = 'digits'
    config.num_iterations = 10
    config.batch_size = 16
    config.n_s = 2
    config.generator.hidden = 8
    # Adam with eps 1e-8 turns float rounding in near-zero gradients (biases before a
    # BatchNorm) into whole-step differences between CPUs; 1e-3 keeps the golden values stable
    # (tests/test_parallel.py explains it). The iteration's code is the same for any eps.
    config.adam_eps = 1e-3
    for name, value in overrides.items():
        config[name] = value
    return config


def run_iterations(config, iterations: int = ITERATIONS):
    """{name: array} of the states after ``iterations`` and every iteration's metrics."""
    import jax
    import jax.numpy as jnp
    from zskt_jax import parallel
    from zskt_jax.models import Generator, build_wide_resnet
    from zskt_jax.parallel import DATA_AXIS
    from zskt_jax.state import init_variables
    from zskt_jax.zero_shot import Models, create_states, make_iteration_fn
    models = Models(generator=Generator(init_size=8, hidden=8, axis_name=DATA_AXIS),
                    student=build_wide_resnet('WRN-10-1', 10, 4, axis_name=DATA_AXIS),
                    teacher=build_wide_resnet('WRN-10-1', 10, 4, axis_name=DATA_AXIS))
    mesh = parallel.make_mesh(jax.devices()[:1])
    teacher = init_variables(models.teacher, jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
    teacher['params']['fc']['kernel'] = teacher['params']['fc']['kernel'] * 20  # confident
    teacher = parallel.replicate(teacher, mesh)
    state, z_key = create_states(config, models, mesh)
    step = make_iteration_fn(models, config, mesh)
    out = {}
    for i in range(iterations):
        state, metrics = step(state, teacher, z_key)
        out.update({f'metrics{i}/{k}': np.asarray(v) for k, v in metrics.items()})
    for name in ('generator', 'student'):
        for path, leaf in jax.tree_util.tree_flatten_with_path(
                jax.device_get(getattr(state, name).state_dict()))[0]:
            out[name + jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


if __name__ == '__main__':
    sys.path[:0] = [TESTS_DIR, ROOT]
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    values = run_iterations(paper_config())
    np.savez(GOLDEN, **values)
    print(f'{len(values)} arrays written to {GOLDEN}')
