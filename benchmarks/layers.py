"""Per-layer profile of a zero-shot iteration: every convolution shape of the teacher, the
student and the generator (forward, input gradient, kernel gradient) and every BatchNorm + ReLU
(forward and backward), timed alone in XLA, in oneDNN through ``zskt_jax.onednn`` (what
``config.convolution = 'onednn'`` runs) and in PyTorch, on the same shapes and the same CPU.

    python benchmarks/layers.py                 # the paper's WRN-40-2 -> WRN-16-1, batch 128
    python benchmarks/layers.py --pair digits   # the digits default (16x16, width 8, batch 128 + 128 replayed)
    python benchmarks/layers.py --json_out /tmp/layers.json

Each operation is the median of ``--repeats`` calls after a warm-up. The totals multiply each
layer's time by how often one iteration runs it (n_g generator updates, n_s student updates,
the images and the teacher's outputs made once per iteration for the student updates, as
``zskt_jax.iteration`` does): an estimate of where an iteration's time goes, to set beside
``benchmarks/iteration.py``'s measured total (the rest is the optimizers, losses, attention
and XLA's scheduling between layers). See benchmarks/README.md.
"""
import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# This checkout's zskt_jax first, whether or not the project is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from zskt_jax import onednn

NHWC = ('NHWC', 'HWIO', 'NHWC')
PAD = {3: ((1, 1), (1, 1)), 1: ((0, 0), (0, 0))}


def wrn_convs(depth, width, base, size):
    """(in_ch, out_ch, kernel, stride, input size) of each conv of a WRN, in order."""
    n = (depth - 4) // 6
    layers, ch, s = [(3, base, 3, 1, size)], base, size
    for g, stride in enumerate((1, 2, 2)):
        out = base * width * 2 ** g
        for i in range(n):
            st = stride if i == 0 else 1
            layers.append((ch, out, 3, st, s))
            if ch != out:
                layers.append((ch, out, 1, st, s))
            s = s // st
            layers.append((out, out, 3, 1, s))
            ch = out
    return layers


def generator_convs(hidden, size):
    """The generator's convolutions as oneDNN / XLA see them: each x2 upsampling conv is four
    2x2 phase convolutions of the low-resolution input (models/generator.py)."""
    quarter = size // 4
    return ([(hidden, hidden, 2, 1, quarter)] * 4 + [(hidden, hidden // 2, 2, 1, size // 2)] * 4
            + [(hidden // 2, 3, 3, 1, size)])


PAIRS = {
    # name: teacher (depth, width, base), student, generator hidden, image size, batch, student
    # batch (the replayed images join the student's), n_s
    'paper': dict(teacher=(40, 2, 16), student=(16, 1, 16), hidden=128, size=32, batch=128,
                  student_batch=128, n_s=10),
    'digits': dict(teacher=(16, 1, 8), student=(16, 1, 8), hidden=32, size=16, batch=128,
                   student_batch=256, n_s=4),
}


def layer_counts(pair):
    """{(network, in, out, k, stride, size, batch, op): calls per iteration} (n_g = 1)."""
    counts = collections.Counter()
    n_g, n_s, b, sb = 1, pair['n_s'], pair['batch'], pair['student_batch']
    for conv in wrn_convs(*pair['teacher'], pair['size']):
        counts[('teacher',) + conv + (b, 'forward')] += n_g + 1
        counts[('teacher',) + conv + (b, 'input grad')] += n_g
    for conv in wrn_convs(*pair['student'], pair['size']):
        counts[('student',) + conv + (b, 'forward')] += n_g
        counts[('student',) + conv + (b, 'input grad')] += n_g
        counts[('student',) + conv + (sb, 'forward')] += n_s
        counts[('student',) + conv + (sb, 'kernel grad')] += n_s
        if conv[0] != 3:  # the stem's input gradient is not needed to update the student
            counts[('student',) + conv + (sb, 'input grad')] += n_s
    for conv in generator_convs(pair['hidden'], pair['size']):
        counts[('generator',) + conv + (b, 'forward')] += n_g + 1
        counts[('generator',) + conv + (b, 'input grad')] += n_g
        counts[('generator',) + conv + (b, 'kernel grad')] += n_g
    return counts


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_jax_conv(conv, shape, op, repeats):
    cin, cout, k, stride, size, batch = shape
    pad = ((k // 2, k // 2),) * 2 if k != 2 else ((1, 0), (1, 0))
    x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.1
    f = lambda x, w: conv(x, w, (stride, stride), pad, dimension_numbers=NHWC)
    y = jax.eval_shape(f, x, w)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    if op == 'forward':
        run, args = jax.jit(f), (x, w)
    elif op == 'input grad':
        run, args = jax.jit(lambda w, dy: jax.vjp(lambda x: f(x, w), x)[1](dy)[0]), (w, dy)
    else:
        run, args = jax.jit(lambda x, dy: jax.vjp(lambda w: f(x, w), w)[1](dy)[0]), (x, dy)
    return median_time(lambda: jax.block_until_ready(run(*args)), repeats)


def time_jax_norm(channels, size, batch, repeats):
    """BatchNorm (training mode, batch statistics) + ReLU, forward and backward."""
    from zskt_jax.models.layers import BatchNorm
    norm = BatchNorm(use_running_average=False)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    variables = norm.init(jax.random.key(1), x)

    def loss(params, x):
        y, _ = norm.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jax.nn.relu(y) * x)

    run = jax.jit(jax.grad(loss, (0, 1)))
    return median_time(lambda: jax.block_until_ready(run(variables['params'], x)), repeats)


def norm_counts(pair):
    """{(channels, size, batch): BatchNorm + ReLU forward-backward passes per iteration}: one per
    conv output of the student and the generator (the teacher's forward-only norms are cheap
    and counted in the convolutions' rest)."""
    counts = collections.Counter()
    for cin, cout, k, stride, size in wrn_convs(*pair['student'], pair['size']):
        if k == 3:
            counts[(cout, size // stride, pair['student_batch'])] += pair['n_s']
            counts[(cout, size // stride, pair['batch'])] += 1
    return counts


TORCH_WORKER = r'''
import json, statistics, sys, time, torch
torch.set_num_threads(int(sys.argv[2]) or torch.get_num_threads())
jobs, repeats = json.loads(sys.argv[1]), int(sys.argv[3])
def median_time(fn):
    fn(); times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times)
out = []
for job in jobs:
    if job[0] == 'conv':
        cin, cout, k, stride, size, batch, op = job[1:]
        pad = 1 if k == 3 else 0
        x = torch.randn(batch, cin, size + (1 if k == 2 else 0), size + (1 if k == 2 else 0))
        w = torch.randn(cout, cin, k, k) * 0.1
        y = torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
        dy = torch.randn_like(y)
        if op == 'forward':
            fn = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=pad)
        elif op == 'input grad':
            fn = lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, stride=stride, padding=pad)
        else:
            fn = lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=stride, padding=pad)
        with torch.no_grad():
            out.append(median_time(fn))
    else:
        channels, size, batch = job[1:]
        norm = torch.nn.BatchNorm2d(channels)
        x = torch.randn(batch, channels, size, size, requires_grad=True)
        def fn():
            norm.zero_grad(); x.grad = None
            (torch.relu(norm(x)) * x).sum().backward()
        out.append(median_time(fn))
print(json.dumps(out))
'''


def time_torch(jobs, threads, repeats):
    done = subprocess.run([sys.executable, '-c', TORCH_WORKER, json.dumps(jobs), str(threads),
                           str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_model():
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True).stdout
        return next(line.split(':', 1)[1].strip() for line in out.splitlines()
                    if line.startswith('Model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pair', choices=sorted(PAIRS), default='paper')
    parser.add_argument('--repeats', type=int, default=10)
    parser.add_argument('--torch_threads', type=int, default=0, help='0: every core')
    parser.add_argument('--skip_torch', action='store_true')
    parser.add_argument('--json_out')
    args = parser.parse_args(argv)
    pair = PAIRS[args.pair]
    usable, line = onednn.usable()
    print(f'== per-layer profile, {args.pair} pair, on {cpu_model()} ({os.cpu_count()} cores); '
          f'{line if usable else "oneDNN: " + line}')
    counts = layer_counts(pair)
    norms = norm_counts(pair)
    shapes = sorted(set(counts))
    torch_times = [None] * (len(shapes) + len(norms))
    if not args.skip_torch:
        jobs = ([['conv', *key[1:]] for key in shapes]
                + [['norm', *key] for key in sorted(norms)])
        torch_times = time_torch(jobs, args.torch_threads, args.repeats)
    rows, totals = [], collections.defaultdict(lambda: collections.Counter())
    header = (f'{"network":9} {"in->out":>9} {"k":>2} {"s":>2} {"size":>4} {"batch":>5} '
              f'{"op":11} {"calls":>5} | {"XLA ms":>7} {"oneDNN ms":>9} {"torch ms":>8} | '
              f'GFLOP/s XLA / oneDNN / torch')
    print(header)
    for key, torch_s in zip(shapes, torch_times):
        network, cin, cout, k, stride, size, batch, op = key
        out_size = size // stride if k != 2 else size
        flops = 2 * batch * out_size * out_size * cout * cin * k * k
        xla_s = time_jax_conv(jax.lax.conv_general_dilated, (cin, cout, k, stride, size, batch),
                              op, args.repeats)
        dnn_s = (time_jax_conv(onednn.conv_general_dilated, (cin, cout, k, stride, size, batch),
                               op, args.repeats) if usable else None)
        calls = counts[key]
        for name, t in (('xla', xla_s), ('onednn', dnn_s), ('torch', torch_s)):
            if t is not None:
                totals[name][op] += calls * t
        rates = ' / '.join(f'{flops / t / 1e9:.0f}' if t else '-' for t in (xla_s, dnn_s, torch_s))
        print(f'{network:9} {cin:>4}->{cout:<4} {k:>2} {stride:>2} {size:>4} {batch:>5} {op:11} '
              f'{calls:>5} | {xla_s * 1e3:7.2f} {dnn_s * 1e3 if dnn_s else float("nan"):9.2f} '
              f'{torch_s * 1e3 if torch_s else float("nan"):8.2f} | {rates}')
        rows.append(dict(network=network, in_channels=cin, out_channels=cout, kernel=k,
                         stride=stride, size=size, batch=batch, op=op, calls=calls, flops=flops,
                         xla_s=xla_s, onednn_s=dnn_s, torch_s=torch_s))
    for key, torch_s in zip(sorted(norms), torch_times[len(shapes):]):
        channels, size, batch = key
        jax_s = time_jax_norm(channels, size, batch, args.repeats)
        for name, t in (('xla', jax_s), ('onednn', jax_s), ('torch', torch_s)):
            if t is not None:
                totals[name]['BatchNorm + ReLU'] += norms[key] * t
        print(f'{"BN+ReLU":9} {channels:>9} {"":>2} {"":>2} {size:>4} {batch:>5} {"fwd+bwd":11} '
              f'{norms[key]:>5} | {jax_s * 1e3:7.2f} {"(same)":>9} '
              f'{torch_s * 1e3 if torch_s else float("nan"):8.2f} |')
        rows.append(dict(network='student', op='BatchNorm + ReLU', channels=channels, size=size,
                         batch=batch, calls=norms[key], jax_s=jax_s, torch_s=torch_s))
    print('\nseconds per iteration spent in each kind of layer (time x calls):')
    ops = ('forward', 'input grad', 'kernel grad', 'BatchNorm + ReLU')
    print(f'{"":12}' + ''.join(f'{op:>18}' for op in ops) + f'{"sum":>9}')
    for name in ('xla', 'onednn', 'torch'):
        if totals[name]:
            print(f'{name:12}' + ''.join(f'{totals[name][op]:18.3f}' for op in ops)
                  + f'{sum(totals[name].values()):9.3f}')
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump({'pair': args.pair, 'cpu': cpu_model(), 'cores': os.cpu_count(),
                       'onednn': line, 'rows': rows,
                       'totals_s': {k: dict(v) for k, v in totals.items()}}, f, indent=2)
        print(f'wrote {args.json_out}')


if __name__ == '__main__':
    main()
