"""Everything a lent GPU should measure, as one command that writes one JSON (under 8 minutes on
one H200-class GPU; every part also runs, slowly, on CPU):

    python benchmarks/gpu_check.py --out=gpu_check.json
    python benchmarks/gpu_check.py --quick --out=/tmp/gpu_check.json   # CPU smoke test (tests/)

1. The paper's iteration (``benchmarks/iteration.py``: WRN-40-2 -> WRN-16-1, batch 128, n_g 1,
   n_s 10) in float32, with PyTorch timed in the same run (the authors' iteration and the same
   work as ours) where torch is installed; then bfloat16, ``num_seeds = 3``, and the n_g/n_s
   updates unrolled against the backend's default loop (``lax.scan`` on GPU/TPU).
2. The generator's ``upsample_conv3x3`` against nearest upsampling followed by a plain 3x3
   convolution, forward and backward, at the paper's two generator layers.
3. The digits default (``configs/digits.py``: teacher recipe, then 500 iterations) and the larger
   pair (WRN-16-2 -> WRN-16-1 at base width 16, 250 iterations, its own teacher) through
   ``run.py``, each with its wall time and final accuracy.

Nothing is downloaded: the digits are built offline; torch is used only if it is installed.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import iteration  # noqa: E402  (benchmarks/iteration.py)

# (name, extra flags of benchmarks/iteration.py); the first one also times PyTorch.
ITERATION_VARIANTS = (
    ('float32', ['--compute_dtype', 'float32']),
    ('bfloat16', ['--compute_dtype', 'bfloat16', '--skip_torch']),
    ('num_seeds_3', ['--num_seeds', '3', '--skip_torch']),
    ('unrolled', ['--update_loop', 'unroll', '--skip_torch']),
)
# The paper's generator layers: (input [B, H, W, Ci], Co) at batch 128, hidden 128.
UPSAMPLE_LAYERS = (((128, 8, 8, 128), 128), ((128, 16, 16, 128), 64))
QUICK_UPSAMPLE_LAYERS = (((8, 4, 4, 8), 8),)
DIGITS_RUNS = (
    ('digits_default', []),
    ('digits_wrn16_2_to_wrn16_1', ['--config.teacher.arch=WRN-16-2',
                                   '--config.teacher.base_width=16',
                                   '--config.student.base_width=16',
                                   '--config.num_iterations=250',
                                   '--config.eval_every_iterations=25']),
)
# --quick: a tiny teacher (the first two flags) and 4 iterations (a smoke test of this script,
# not a measurement).
QUICK_DIGITS = ['--config.teacher.arch=WRN-10-1', '--config.teacher.base_width=4',
                '--config.student.arch=WRN-10-1', '--config.student.base_width=4',
                '--config.generator.hidden=8', '--config.num_iterations=4',
                '--config.eval_every_iterations=2', '--config.log_every_iterations=2',
                '--config.checkpoint_every_iterations=4',
                '--config.replay_size=512', '--config.weight_grad_chunk=0']


def time_iterations(quick: bool, log):
    """benchmarks/iteration.py's whole result (JAX, and PyTorch beside float32) per variant."""
    results = {}
    for name, flags in ITERATION_VARIANTS:
        log(f'== iteration benchmark: {name} ==')
        argv = flags + (['--quick', '--repeats', '2', '--warmup', '1'] if quick else [])
        results[name] = iteration.main(argv)
    return results


def time_upsample(quick: bool, repeats: int, log):
    """Seconds of forward + backward of both ways to compute the generator's upsampling layers."""
    import jax
    import jax.numpy as jnp
    from zskt_jax.models.generator import upsample_conv3x3

    def plain(x, kernel):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

    results = []
    for shape, out_channels in (QUICK_UPSAMPLE_LAYERS if quick else UPSAMPLE_LAYERS):
        x = jax.random.normal(jax.random.key(0), shape)
        kernel = jax.random.normal(jax.random.key(1), (3, 3, shape[-1], out_channels)) * 0.05
        entry = {'input': list(shape), 'out_channels': out_channels}
        for name, fn in (('upsample_conv3x3', upsample_conv3x3), ('upsample_then_conv', plain)):
            step = jax.jit(jax.value_and_grad(lambda x, k: jnp.sum(fn(x, k) ** 2), (0, 1)))
            jax.block_until_ready(step(x, kernel))  # compile
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(x, kernel))
                times.append(time.perf_counter() - start)
            entry[f'{name}_s'] = statistics.median(times)
        entry['speedup'] = entry['upsample_then_conv_s'] / entry['upsample_conv3x3_s']
        log(f"  upsample layer {shape} -> {out_channels}: {entry['upsample_conv3x3_s'] * 1e3:.2f} "
            f"ms against {entry['upsample_then_conv_s'] * 1e3:.2f} ms ({entry['speedup']:.2f}x)")
        results.append(entry)
    return results


def run_py(name, args, log):
    command = [sys.executable, os.path.join(ROOT, 'run.py'), *args]
    log(f'== {name}: run.py {" ".join(args)} ==')
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f'{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n'
                         f'{done.stderr[-3000:]}')
    return time.perf_counter() - start


def digits_runs(quick: bool, workdir: str, log):
    """Each run trains its teacher with the recipe first (timed with it); --quick trains a tiny
    teacher for one epoch instead, then distils it for 4 iterations."""
    results = {}
    for name, flags in DIGITS_RUNS[:1] if quick else DIGITS_RUNS:
        run_dir, teacher = os.path.join(workdir, name), os.path.join(workdir, f'{name}_teacher')
        wall = 0.0
        if quick:
            wall += run_py(f'{name} teacher', [
                '--config=configs/teacher_digits.py', '--config.epochs=1', f'--workdir={teacher}',
                *QUICK_DIGITS[:2]], log)
            flags = flags + QUICK_DIGITS + ['--config.teacher.recipe=']
        wall += run_py(name, ['--config=configs/digits.py', f'--workdir={run_dir}',
                              f'--config.teacher.checkpoint={teacher}/teacher', *flags], log)
        with open(os.path.join(run_dir, 'results.json')) as f:
            run = json.load(f)
        results[name] = {'wall_time_s_with_teacher': wall,
                         'student_wall_time_s': run['wall_time_s'],
                         'student_accuracy': run['student_accuracy'],
                         'teacher_accuracy': run['teacher_accuracy'],
                         'backend': run['backend'], 'devices': run['devices']}
        log(f"  {run['student_accuracy']:.2%} (teacher {run['teacher_accuracy']:.2%}), "
            f'{wall:.0f} s with the teacher')
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='gpu_check.json', help='the JSON with every number')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test on CPU')
    args = parser.parse_args(argv)
    log = lambda line='': print(line, flush=True)
    import jax
    start = time.perf_counter()
    report = {'platform': platform.platform(), 'python': platform.python_version(),
              'jax_version': jax.__version__, 'backend': jax.default_backend(),
              'devices': [str(d.device_kind) for d in jax.devices()], 'quick': args.quick}
    log(f"gpu_check on {report['backend']}: {report['devices']}")
    report['iteration'] = time_iterations(args.quick, log)
    log('== the generator upsampling layers ==')
    report['upsample_conv3x3'] = time_upsample(args.quick, 3 if args.quick else 20, log)
    with tempfile.TemporaryDirectory() as workdir:
        report['digits'] = digits_runs(args.quick, workdir, log)
    report['total_s'] = time.perf_counter() - start
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=2, default=str)
    log(f"gpu_check took {report['total_s']:.0f} s; numbers in {args.out}")
    return report


if __name__ == '__main__':
    main()
