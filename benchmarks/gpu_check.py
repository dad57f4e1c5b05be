"""Everything a lent GPU should measure, as one command that writes one JSON (about 15 minutes
on one H200-class GPU; --parts and --budget_s fit it to less; every part also runs, slowly, on
CPU):

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
   ``run.py``, each with its wall time and final accuracy; then the digits default's seeds 1-4
   from the same teacher (does every seed reach 97% of it on this device?).

Nothing is downloaded: torch is used only if it is installed. On a bare GPU image (no TFDS, no
TensorFlow, no package index) run ``benchmarks/prepare_device.py`` on a machine that has the
project, carry its folder along, and pass it as ``--device_dir``: the wheels are installed with
``pip install --no-index`` into a folder of their own and TFDS reads the prepared digits
(array_record, no TensorFlow):

    PYTHONPATH=. python benchmarks/gpu_check.py --device_dir=.device --out=gpu_check.json

Each part is written to the JSON as soon as it ends; a part that fails is recorded with its
error and the next one runs; parts left when ``--budget_s`` is spent are recorded as skipped.
The parts run in ``--parts`` order (default: what users run first).
"""
import argparse
import functools
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's zskt_jax, whether or not it is installed

# (name, extra flags of benchmarks/iteration.py); the first one also times PyTorch.
ITERATION_VARIANTS = (
    ('float32', ['--compute_dtype', 'float32']),
    ('bfloat16', ['--compute_dtype', 'bfloat16', '--skip_torch']),
    ('num_seeds_3', ['--num_seeds', '3', '--skip_torch']),
    ('unrolled', ['--update_loop', 'unroll', '--skip_torch']),
    # The field's main pair at the toolbox's batch: ResNet-34 -> ResNet-18 (widths 64), batch 256
    # (--quick keeps its tiny sizes and batch).
    ('resnet34_resnet18_b256', ['--teacher', 'resnet34', '--student', 'resnet18',
                                '--batch_size', '256', '--skip_torch']),
)
# The paper's generator layers: (input [B, H, W, Ci], Co) at batch 128, hidden 128.
UPSAMPLE_LAYERS = (((128, 8, 8, 128), 128), ((128, 16, 16, 128), 64))
QUICK_UPSAMPLE_LAYERS = (((8, 4, 4, 8), 8),)
DIGITS_RUNS = (
    # (name, extra flags of run.py, seeds, the run whose teacher it shares or '' for its own)
    ('digits_default', [], (0,), ''),
    ('digits_wrn16_2_to_wrn16_1', ['--config.teacher.arch=WRN-16-2',
                                   '--config.teacher.base_width=16',
                                   '--config.student.base_width=16',
                                   '--config.num_iterations=250',
                                   '--config.eval_every_iterations=25'], (0,), ''),
    # Does the default reach 97% of its teacher on every seed here? (--quick: seed 1 only)
    ('digits_default_seeds_1_4', [], (1, 2, 3, 4), 'digits_default'),
)
# --quick: a tiny teacher (the first two flags) and 4 iterations (a smoke test of this script,
# not a measurement).
QUICK_DIGITS = ['--config.teacher.arch=WRN-10-1', '--config.teacher.base_width=4',
                '--config.student.arch=WRN-10-1', '--config.student.base_width=4',
                '--config.generator.hidden=8', '--config.num_iterations=4',
                '--config.eval_every_iterations=2', '--config.log_every_iterations=2',
                '--config.checkpoint_every_iterations=4',
                '--config.replay_size=512', '--config.weight_grad_chunk=0']


def time_iteration(flags, quick: bool):
    """benchmarks/iteration.py's whole result (JAX, and PyTorch unless --skip_torch)."""
    import iteration  # benchmarks/iteration.py, beside this file (imported once TFDS is there)
    if quick:  # the tiny sizes of --quick, whatever batch the variant names
        flags = [f for i, f in enumerate(flags)
                 if f != '--batch_size' and (i == 0 or flags[i - 1] != '--batch_size')]
        flags += ['--quick', '--repeats', '2', '--warmup', '1']
    return iteration.main(flags)


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


def digits_run(name: str, flags, seeds, teacher_of: str, quick: bool, workdir: str, log):
    """Distils the run's teacher into a student for each seed. The teacher is the one of the run
    ``teacher_of`` (or this run's own), trained with the recipe at the first seed that finds none
    (timed with it); --quick trains a tiny teacher for one epoch instead and distils it for 4
    iterations."""
    teacher = os.path.join(workdir, f'{teacher_of or name}_teacher')
    wall = 0.0
    if quick:
        if not os.path.exists(os.path.join(teacher, 'teacher')):
            wall += run_py(f'{name} teacher', [
                '--config=configs/teacher_digits.py', '--config.epochs=1', f'--workdir={teacher}',
                *QUICK_DIGITS[:2]], log)
        flags = list(flags) + QUICK_DIGITS + ['--config.teacher.recipe=']
    runs = []
    for seed in seeds:
        run_dir = os.path.join(workdir, f'{name}_seed{seed}')
        wall += run_py(f'{name}, seed {seed}', [
            '--config=configs/digits.py', f'--workdir={run_dir}', f'--config.seed={seed}',
            f'--config.teacher.checkpoint={teacher}/teacher', *flags], log)
        with open(os.path.join(run_dir, 'results.json')) as f:
            runs.append(json.load(f))
        log(f"  seed {seed}: {runs[-1]['student_accuracy']:.2%} "
            f"(teacher {runs[-1]['teacher_accuracy']:.2%})")
    log(f'  {wall:.0f} s with the teacher')
    per_seed = [run['student_accuracy'] for run in runs]
    teacher_accuracy = runs[0]['teacher_accuracy']
    return {'wall_time_s_with_teacher': wall, 'seeds': list(seeds),
            'student_wall_time_s': [run['wall_time_s'] for run in runs],
            'student_accuracy': statistics.mean(per_seed), 'student_accuracy_per_seed': per_seed,
            'share_of_teacher_per_seed': [a / teacher_accuracy for a in per_seed],
            'teacher_accuracy': teacher_accuracy,
            'backend': runs[0]['backend'], 'devices': runs[0]['devices']}


def parts(quick: bool, workdir: str, log):
    """name -> a function of no arguments returning that part's numbers."""
    table = {name: (lambda flags=flags: time_iteration(flags, quick))
             for name, flags in ITERATION_VARIANTS}
    table['upsample_conv3x3'] = lambda: time_upsample(quick, 3 if quick else 20, log)
    for name, flags, seeds, teacher_of in DIGITS_RUNS:
        if quick:  # the default's parts, one seed each, from one tiny teacher
            if flags:  # the larger pair: its sizes are not the tiny ones
                continue
            seeds = seeds[:1]
        table[name] = functools.partial(digits_run, name, flags, seeds, teacher_of, quick,
                                        workdir, log)
    return table


# Default order: the user's job first, then the paper's iteration against PyTorch, then the rest.
DEFAULT_ORDER = ('digits_default', 'float32', 'resnet34_resnet18_b256',
                 'digits_wrn16_2_to_wrn16_1', 'digits_default_seeds_1_4', 'bfloat16',
                 'upsample_conv3x3', 'unrolled', 'num_seeds_3')


def install_device_dir(device_dir: str, log) -> None:
    """Install ``device_dir/wheels`` (benchmarks/prepare_device.py) without a network into a
    folder of their own, put it first on this process's path and its children's, and point TFDS
    at ``device_dir/tensorflow_datasets``."""
    wheels = sorted(glob.glob(os.path.join(device_dir, 'wheels', '*.whl')))
    data_dir = os.path.join(device_dir, 'tensorflow_datasets')
    if not wheels or not os.path.isdir(data_dir):
        raise SystemExit(f'--device_dir {device_dir}: no wheels/*.whl or tensorflow_datasets/ in '
                         'it; run python benchmarks/prepare_device.py first.')
    site = os.path.join(tempfile.gettempdir(), 'zskt_jax_device_site')
    start = time.perf_counter()
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-index',
                    '--find-links', os.path.join(device_dir, 'wheels'), '--no-deps',
                    '--no-compile', '--upgrade', '--target', site, *wheels], check=True)
    sys.path.insert(0, site)
    os.environ['PYTHONPATH'] = os.pathsep.join(
        p for p in (site, os.environ.get('PYTHONPATH')) if p)
    os.environ['TFDS_DATA_DIR'] = os.path.abspath(data_dir)
    log(f'installed {len(wheels)} wheels into {site} in {time.perf_counter() - start:.0f} s; '
        f'TFDS_DATA_DIR={data_dir}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default='gpu_check.json', help='the JSON with every number')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: a smoke test on CPU')
    parser.add_argument('--device_dir', default='',
                        help="benchmarks/prepare_device.py's folder: wheels to install offline "
                             'and the digits as array_record')
    parser.add_argument('--parts', default=','.join(DEFAULT_ORDER),
                        help=f'comma-separated, in order (default: {",".join(DEFAULT_ORDER)})')
    parser.add_argument('--budget_s', type=float, default=float('inf'),
                        help='start no part after this many seconds (the rest: skipped)')
    args = parser.parse_args(argv)
    unknown = [name for name in args.parts.split(',') if name not in DEFAULT_ORDER]
    if unknown:
        parser.error(f'--parts: unknown part(s) {", ".join(map(repr, unknown))}; known: '
                     f'{", ".join(DEFAULT_ORDER)}')
    log = lambda line='': print(line, flush=True)
    start = time.perf_counter()
    if args.device_dir:
        install_device_dir(args.device_dir, log)
    import jax
    import tensorflow_datasets
    from zskt_jax import data
    report = {'platform': platform.platform(), 'python': platform.python_version(),
              'jax_version': jax.__version__, 'backend': jax.default_backend(),
              'devices': [str(d.device_kind) for d in jax.devices()], 'quick': args.quick,
              'tensorflow_installed': data.tensorflow_installed(),
              'tensorflow_datasets_from': os.path.dirname(tensorflow_datasets.__file__),
              'parts': {}}
    log(f"gpu_check on {report['backend']}: {report['devices']}, jax {jax.__version__}")

    def save():
        report['total_s'] = time.perf_counter() - start
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=2, default=str)

    with tempfile.TemporaryDirectory() as workdir:
        table = parts(args.quick, workdir, log)
        for name in args.parts.split(','):
            if name not in table:
                continue  # a full-size part that --quick leaves out
            elapsed = time.perf_counter() - start
            if elapsed > args.budget_s:
                log(f'== {name}: skipped ({elapsed:.0f} s spent of --budget_s {args.budget_s:.0f})')
                report['parts'][name] = {'skipped': f'budget spent after {elapsed:.0f} s'}
                save()
                continue
            log(f'== {name} ==')
            part_start = time.perf_counter()
            try:
                report['parts'][name] = table[name]()
            except (Exception, SystemExit) as error:  # record it, go on with the next part
                log(traceback.format_exc()[-3000:])
                report['parts'][name] = {'error': f'{type(error).__name__}: {error}'[-3000:]}
            report['parts'][name + '_s'] = time.perf_counter() - part_start
            save()
    failed = [n for n, part in report['parts'].items() if isinstance(part, dict) and 'error' in part]
    log(f"gpu_check took {report['total_s']:.0f} s; numbers in {args.out}"
        + (f'; FAILED: {", ".join(failed)}' if failed else ''))
    if failed:
        raise SystemExit(1)
    return report


if __name__ == '__main__':
    main()
