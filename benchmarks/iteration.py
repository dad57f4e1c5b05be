"""Times one zero-shot iteration (n_g generator + n_s student updates), JAX against the authors'
PyTorch iteration, on whatever backend is present.

    python benchmarks/iteration.py                          # the paper's WRN-40-2 -> WRN-16-1
    python benchmarks/iteration.py --repeats 3 --warmup 1 --json_out /tmp/iteration.json
    python benchmarks/iteration.py --quick                  # tiny models: a smoke test
    python benchmarks/iteration.py --compute_dtype bfloat16 --skip_torch
    python benchmarks/iteration.py --config configs/digits.py --skip_torch   # the digits default's

The JAX iteration is exactly the one training compiles: ``zero_shot.make_iteration_fn`` on the
states of ``zero_shot.create_states``, built from ``configs/default.py`` (the paper's settings)
(or ``--config``'s file) with a randomly initialised teacher, so no teacher file is needed. It is compiled once and then
timed; the PyTorch baseline (``benchmarks/torch_baseline.py``) runs afterwards in a subprocess of
its own on the same machine. See benchmarks/README.md for what each number means.
"""
import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# This checkout's zskt_jax first, whether or not the project is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from zskt_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

IMAGES_PER_SECOND = ('images/s = generated images consumed per second = '
                     'batch_size * (n_g + n_s) * num_seeds / (seconds per iteration)')

# --quick: tiny networks, a few iterations (a smoke test of this script, not a measurement).
# n_s 2 keeps the unrolled program (and its compile time) small; PyTorch on one thread because
# tiny ops gain nothing from more, and OpenMP threads thrash when other jobs share the cores.
QUICK = dict(teacher='WRN-10-1', student='WRN-10-1', base_width=4, generator_hidden=8,
             batch_size=16, n_s=2, repeats=2, warmup=1, torch_threads=1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='',
                        help='a config file to start from instead of configs/default.py (the '
                             "paper's), e.g. configs/digits.py: its sizes, stabilisers and replay "
                             'memory; JAX only (--skip_torch), the flags below still apply')
    parser.add_argument('--repeats', type=int, help='timed iterations (median reported; default 5)')
    parser.add_argument('--warmup', type=int, help='untimed iterations after compilation (default 2)')
    parser.add_argument('--batch_size', type=int, help='global batch (default: config, 128)')
    parser.add_argument('--teacher', help='teacher architecture, any name of the model registry '
                        '(resnet34, vgg11, WRN-40-2, ...; default: config, WRN-40-2)')
    parser.add_argument('--student', help='student architecture (default: config, WRN-16-1)')
    parser.add_argument('--n_g', type=int, help='generator updates per iteration (default 1)')
    parser.add_argument('--n_s', type=int, help='student updates per iteration (default 10)')
    parser.add_argument('--compute_dtype', choices=('float32', 'bfloat16'),
                        help='JAX activation dtype (default: config, float32); the PyTorch '
                             'baseline is always float32, as the authors ran it')
    parser.add_argument('--num_seeds', type=int,
                        help='seeds trained at once by one iteration (config.num_seeds, where the '
                             'config has that field; default 1)')
    parser.add_argument('--update_loop', choices=('auto', 'scan', 'unroll'),
                        help='n_g/n_s updates as a lax.scan or unrolled (default: config, auto)')
    parser.add_argument('--weight_grad_chunk', type=int,
                        help='conv kernel gradients summed over slices of this many examples '
                             '(config.weight_grad_chunk; default: config, 0 = off)')
    parser.add_argument('--convolution', choices=('xla', 'onednn'),
                        help="XLA's convolutions or oneDNN's on XLA:CPU (config.convolution; "
                             'default: config, xla)')
    parser.add_argument('--quick', action='store_true',
                        help='smoke mode: WRN-10-1 (base width 4) -> WRN-10-1, generator hidden 8, '
                             'batch 16, n_s 2, 1 warm-up + 2 timed iterations, PyTorch on 1 '
                             'thread (explicit flags still win)')
    parser.add_argument('--skip_torch', action='store_true', help='time JAX only')
    parser.add_argument('--torch_threads', type=int,
                        help='torch.set_num_threads for the baseline (default: every core)')
    parser.add_argument('--torch_device', default='auto',
                        help='baseline device: auto (cuda if the installed torch has it) | cpu | cuda')
    parser.add_argument('--skip_torch_flops', action='store_true',
                        help="don't count the baseline's FLOPs (costs one more PyTorch iteration)")
    parser.add_argument('--json_out', default='', help='write every number here as JSON')
    args = parser.parse_args(argv)
    args.base_width = args.generator_hidden = None
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    args.repeats = 5 if args.repeats is None else args.repeats
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.repeats < 1:
        parser.error(f'--repeats must be at least 1, got {args.repeats}')
    if args.config and not args.skip_torch:
        parser.error("--config: the PyTorch baselines are the paper's iteration only; add "
                     '--skip_torch')
    return args


def build_config(args):
    """configs/default.py (the paper's settings), or --config's file, with the flags applied."""
    if args.config:
        from zskt_jax import errors, launch
        try:
            config = launch.load_config_file(launch.find_config_file(args.config))
        except errors.ConfigError as error:
            raise SystemExit(f'--config: {error}') from None
    else:
        from configs import default
        config = default.get_config()
    if args.teacher:  # any name of zskt_jax.models.registry, at its own width by default
        config.teacher.arch, config.teacher.base_width = args.teacher, 0
    if args.student:
        config.student.arch, config.student.base_width = args.student, 0
    if args.base_width:
        config.teacher.base_width = config.student.base_width = args.base_width
    if args.generator_hidden:
        config.generator.hidden = args.generator_hidden
    for name in ('batch_size', 'n_g', 'n_s', 'compute_dtype', 'update_loop', 'weight_grad_chunk',
                 'convolution'):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.num_seeds is not None:
        if 'num_seeds' in config:
            config.num_seeds = args.num_seeds
        elif args.num_seeds != 1:
            raise SystemExit(f'--num_seeds {args.num_seeds}: this version of configs/default.py '
                             'has no num_seeds field, so one iteration trains one seed.')
    return config


def num_seeds(config) -> int:
    return int(config.get('num_seeds', 1))


def images_per_iteration(config) -> int:
    return config.batch_size * (config.n_g + config.n_s) * num_seeds(config)


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per module
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get('flops', float('nan')))


def host_peak_rss():
    """(bytes, description) of this process's peak resident memory: VmHWM from /proc (Linux),
    else ru_maxrss. (On Linux ru_maxrss survives fork + exec, so a subprocess started by a bigger
    parent would report the parent's peak; VmHWM belongs to the process's own address space.)"""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024, 'process peak RSS (VmHWM, /proc/self/status)'
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if platform.system() == 'Darwin' else 1024), \
        'process max RSS (resource.getrusage)'


def peak_memory():
    """Device peak (memory_stats()['peak_bytes_in_use'], max over local devices) where the backend
    reports it (GPU, TPU), else the process's max RSS (CPU, where it includes Python, JAX and
    compilation)."""
    peaks = []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and 'peak_bytes_in_use' in stats:
            peaks.append(stats['peak_bytes_in_use'])
    if peaks:
        return max(peaks), "device memory_stats()['peak_bytes_in_use'] (max over local devices)"
    return host_peak_rss()


def initialise(fn, *args):
    """``fn(*args)``, compiled at XLA optimisation level 0 when that works.

    Initialisation runs once and is not timed, yet compiling it with full optimisation (one
    threefry per parameter) took 20-30 s for a tiny WRN on this 2-core CPU, against ~3 s at
    level 0. The values are random initial weights either way. Falls back to a plain call
    (which raises any real error) where the function cannot be traced.
    """
    try:
        compiled = jax.jit(fn).lower(*args).compile(
            compiler_options={'xla_backend_optimization_level': 0})
    except Exception:  # not traceable here (e.g. multi-process placement): run it as it is
        return fn(*args)
    return compiled(*args)


def build_models(config, info):
    from zskt_jax import common, zero_shot
    return zero_shot.Models(
        generator=common.build_generator(config),
        student=common.build_network(config.student, info.num_classes, config),
        teacher=common.build_network(config.teacher, info.num_classes, config))


def time_jax(config, repeats: int, warmup: int, log=print):
    """Compile the training iteration once, run it warmup + repeats times; returns a dict."""
    from zskt_jax import common, data, parallel, zero_shot
    setup_start = time.perf_counter()
    info = data.dataset_info(config.dataset)
    mesh = parallel.make_mesh()
    parallel.check_divisible(config.batch_size, mesh)
    models = build_models(config, info)
    # A randomly initialised teacher: the cost of an iteration does not depend on its weights.
    teacher_variables = initialise(models.teacher.init, jax.random.key(config.seed + 1),
                                   jnp.zeros((2,) + tuple(info.image_shape)))
    teacher_variables = parallel.replicate(teacher_variables, mesh)
    state, z_key = initialise(lambda: zero_shot.create_states(config, models, mesh))
    unroll = zero_shot.use_unrolled_loops(config)
    iteration_fn = zero_shot.make_iteration_fn(models, config, mesh)

    setup_s = time.perf_counter() - setup_start
    start = time.perf_counter()
    compiled = iteration_fn.lower(state, teacher_variables, z_key).compile()
    compile_s = time.perf_counter() - start
    flops_compiled = xla_flops(compiled)
    convolution = common.convolution(config)
    if unroll and convolution == 'xla':
        flops, flops_note = flops_compiled, 'XLA cost analysis of the compiled (unrolled) iteration'
    else:
        # XLA's cost analysis counts a while-loop (lax.scan) body ONCE, whatever its trip count,
        # and cannot see into custom calls (oneDNN's convolutions): count the same iteration
        # compiled unrolled, with XLA's convolutions.
        counted_config = config.copy_and_resolve_references()
        counted_config.update_loop, counted_config.convolution = 'unroll', 'xla'
        counted = zero_shot.make_iteration_fn(build_models(counted_config, info), counted_config,
                                              mesh)
        flops = xla_flops(counted.lower(state, teacher_variables, z_key).compile())
        flops_note = (f'XLA cost analysis of the same iteration compiled unrolled with XLA\'s '
                      f'convolutions; this program reports {fmt_flops(flops_compiled)}: XLA '
                      'counts a loop body once and no custom call')

    def step(state):
        state, metrics = compiled(state, teacher_variables, z_key)
        # Block on each iteration, as training does: on CPU, collectives dispatched in a loop
        # without waiting can deadlock.
        jax.block_until_ready((state, metrics))
        return state, metrics

    metrics = None
    for _ in range(warmup):
        state, metrics = step(state)
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state)
        times.append(time.perf_counter() - start)
        log(f'  [jax] iteration {k + 1}/{repeats}: {times[-1]:.3f} s')
    finite = all(bool(np.all(np.isfinite(np.asarray(v)))) for v in jax.device_get(metrics).values())
    memory, memory_source = peak_memory()
    devices = jax.devices()
    return {
        'framework': 'jax', 'jax_version': jax.__version__, 'backend': jax.default_backend(),
        'devices': len(devices), 'device_kind': devices[0].device_kind,
        'compute_dtype': config.compute_dtype, 'update_loop': 'unroll' if unroll else 'scan',
        'weight_grad_chunk': common.weight_grad_chunk(config), 'convolution': convolution,
        'setup_s': setup_s, 'compile_s': compile_s, 'repeats': repeats, 'warmup': warmup, 'times_s': times,
        'seconds_per_iteration': statistics.median(times), 'flops_per_iteration': flops,
        'flops_source': flops_note, 'flops_compiled_program': flops_compiled,
        'peak_memory_bytes': memory, 'peak_memory_source': memory_source,
        'metrics_finite': finite,
    }


def time_torch(config, args, log=print, work='authors'):
    """Runs benchmarks/torch_baseline.py in a subprocess (its own threads and memory peak)."""
    if importlib.util.find_spec('torch') is None:
        log('PyTorch baseline skipped: torch is not installed (pip install torch==2.13.0; '
            'never plain `torch`, which pulls GBs of CUDA wheels)')
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'torch.json')
        command = [sys.executable, os.path.join(ROOT, 'benchmarks', 'torch_baseline.py'),
                   '--teacher', config.teacher.arch, '--student', config.student.arch,
                   '--teacher_base_width', str(config.teacher.base_width),
                   '--student_base_width', str(config.student.base_width),
                   '--generator_hidden', str(config.generator.hidden),
                   '--z_dim', str(config.generator.z_dim),
                   '--batch_size', str(config.batch_size), '--n_g', str(config.n_g),
                   '--n_s', str(config.n_s), '--beta', str(config.beta),
                   '--repeats', str(args.repeats), '--warmup', str(args.warmup),
                   '--device', args.torch_device, '--threads', str(args.torch_threads or 0),
                   '--work', work, '--json_out', out]
        if args.skip_torch_flops:
            command.append('--no_flops')
        from zskt_jax import data
        command += ['--num_classes', str(data.dataset_info(config.dataset).num_classes)]
        subprocess.run(command, check=True, cwd=ROOT)
        with open(out) as f:
            return json.load(f)


def fmt_bytes(n):
    return f'{n / 2**30:.2f} GiB'


def fmt_flops(n):
    if n is None or not np.isfinite(n):
        return 'n/a'
    return f'{n / 1e12:.3f} TFLOP' if n >= 1e11 else f'{n / 1e9:.3f} GFLOP'


def report(result, config, log):
    """The common lines of one framework's result; returns its images per second."""
    s = result['seconds_per_iteration']
    images = images_per_iteration(config) if result['framework'] == 'jax' else \
        config.batch_size * (config.n_g + config.n_s)
    times = result['times_s']
    log(f'  s/it: {s:.4f} (median of {len(times)}; min {min(times):.4f}, max {max(times):.4f})')
    log(f'  images/s: {images / s:.1f}')
    flops = result['flops_per_iteration']
    log(f"  FLOP/it: {fmt_flops(flops)} ({result['flops_source']})")
    if flops is not None and np.isfinite(flops):
        log(f'  FLOP/s: {flops / s / 1e9:.1f} GFLOP/s achieved')
    log(f"  peak memory: {fmt_bytes(result['peak_memory_bytes'])} "
        f"({result['peak_memory_source']})")
    return images / s


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    log = lambda line='': print(line, flush=True)
    config = build_config(args)
    seeds = num_seeds(config)
    log(f'== zero-shot iteration: {config.teacher.arch} (base width {config.teacher.base_width}) '
        f'-> {config.student.arch} (base width {config.student.base_width}), generator hidden '
        f'{config.generator.hidden}, batch {config.batch_size}, n_g {config.n_g}, '
        f'n_s {config.n_s}, {seeds} seed(s) per iteration ==')
    log(f'machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, '
        f'load average {os.getloadavg()[0]:.2f} at start')
    log(IMAGES_PER_SECOND)

    jax_result = time_jax(config, args.repeats, args.warmup, log)
    log(f"JAX {jax_result['jax_version']} on {jax_result['backend']} ({jax_result['devices']} x "
        f"{jax_result['device_kind']}), {jax_result['compute_dtype']}, update loop: "
        f"{jax_result['update_loop']}, kernel-gradient slices: "
        f"{jax_result['weight_grad_chunk'] or 'off'}, convolutions: {jax_result['convolution']}")
    log(f"  set-up (initialising the networks): {jax_result['setup_s']:.1f} s; "
        f"compile (lower + compile): {jax_result['compile_s']:.1f} s")
    jax_images = report(jax_result, config, log)
    if not jax_result['metrics_finite']:
        log('  warning: the iteration produced non-finite metrics (random teacher); timings '
            'may not be representative')

    torch_result, speedup, same_result, same_speedup = None, None, None, None
    wide_resnets = all(registry.get(arch).family == 'wrn'
                       for arch in (config.teacher.arch, config.student.arch))
    if not args.skip_torch and not wide_resnets:
        log('PyTorch baseline: skipped (benchmarks/torch_baseline.py builds the authors\' '
            'WideResNets only)')
    elif not args.skip_torch:
        if args.torch_threads is None:
            args.torch_threads = 0  # every core
        log("PyTorch baseline: the authors' iteration (benchmarks/torch_baseline.py)")
        torch_result = time_torch(config, args, log)
    if torch_result is not None:
        log(f"PyTorch {torch_result['torch_version']} on {torch_result['device']}, "
            f"{torch_result['threads']} threads, float32")
        speedup = jax_images / report(torch_result, config, log)
        if torch_result['flops_per_iteration']:
            log(f"FLOP ratio: PyTorch / JAX = "
                f"{torch_result['flops_per_iteration'] / jax_result['flops_per_iteration']:.2f}x "
                '(work per iteration; the PyTorch count omits elementwise ops)')
        log('PyTorch doing the same work as JAX (images and teacher outputs once per iteration, '
            'teacher frozen, no gradient thrown away)')
        same_result = time_torch(config, args, log, work='same')
        same_speedup = jax_images / report(same_result, config, log)
        log(f'ratio: JAX speed-up over PyTorch = {speedup:.2f}x against the authors\' '
            f'iteration, {same_speedup:.2f}x against the same work (JAX images/s / PyTorch '
            'images/s; with one seed, PyTorch s/it / JAX s/it)')
    log(f'load average {os.getloadavg()[0]:.2f} at end')

    result = {'config': config.to_dict(), 'images_per_iteration': images_per_iteration(config),
              'images_per_second_definition': IMAGES_PER_SECOND, 'jax': jax_result,
              'torch': torch_result, 'speedup': speedup, 'torch_same_work': same_result,
              'speedup_same_work': same_speedup, 'cpu_count': os.cpu_count(),
              'platform': platform.platform()}
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(result, f, indent=2, default=str)
        log(f'wrote {args.json_out}')
    return result


if __name__ == '__main__':
    main()
