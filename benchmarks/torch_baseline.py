"""The speed baseline: one zero-shot iteration as the authors' PyTorch code runs it.

Written for ``benchmarks/iteration.py``, which runs this file as a subprocess (so that its
threads, its memory peak and its imports stay apart from the JAX process) and compares the two.
It can also be run by itself:

    python benchmarks/torch_baseline.py                       # WRN-40-2 -> WRN-16-1, batch 128
    python benchmarks/torch_baseline.py --repeats 3 --warmup 1 --json_out /tmp/torch.json

What is faithful to the authors' ``solver.py`` / ``utils/loaders.py`` (docs/method.md, section "The
authors' loop and its cost"), because it decides the cost:
- At every one of the n_g + n_s updates the generator runs forward again, with gradients enabled
  (their ``LearnableLoader.__next__`` is called once per update, on the same z).
- In the n_s student updates the images are NOT detached, so every student backward also
  back-propagates through the generator; those generator gradients are never used (the next
  generator update zeroes them).
- The teacher's weights are not frozen (``requires_grad`` stays True; only ``.eval()`` is called),
  so the generator update also computes teacher weight gradients. They are never zeroed either,
  so they accumulate, as in the authors' code.
- The teacher's outputs for the student updates are computed once per iteration, under
  ``torch.no_grad()``, at the first student update.
- The generator update's backward also fills the student's weight gradients (the student's
  parameters require grad); ``optimizer_student.zero_grad()`` then throws them away.
- Adam (default betas/eps), ``clip_grad_norm_(params, 5)`` before each step, cosine annealing
  stepped once per iteration. float32 throughout.
- The networks are the authors' ``WideResNet`` (models/wresnet.py, dropout 0) and ``Generator``
  (models/generator.py, the 8x8 -> 32x32 version with an affine final BatchNorm), NCHW.

The only generalisations are ``base_width`` (the WRN stem width, 16 in the paper) and
``generator_hidden`` (128 in the paper), which the ``--quick`` smoke mode shrinks.
"""
import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# The networks, as in the authors' repository.

class BasicBlock(nn.Module):
    """Pre-activation basic block (models/wresnet.py, dropout 0)."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (None if self.equal_in_out else
                             nn.Conv2d(in_planes, out_planes, 1, stride, padding=0, bias=False))

    def forward(self, x):
        if not self.equal_in_out:
            x = self.relu1(self.bn1(x))  # the shortcut sees the activated input
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        out = self.conv2(out)
        return torch.add(x if self.equal_in_out else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, num_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(num_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k; returns (logits, group1, group2, group3) like the authors' model."""

    def __init__(self, depth, num_classes, widen_factor=1, base_width=16):
        super().__init__()
        channels = [base_width, base_width * widen_factor, 2 * base_width * widen_factor,
                    4 * base_width * widen_factor]
        assert (depth - 4) % 6 == 0, depth
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.num_features = channels[3]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        activation1 = out
        out = self.block2(out)
        activation2 = out
        out = self.block3(out)
        activation3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, out.shape[-1])  # 8x8 at 32x32 inputs
        out = out.view(-1, self.num_features)
        return self.fc(out), activation1, activation2, activation3


class View(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size

    def forward(self, tensor):
        return tensor.view(self.size)


class Generator(nn.Module):
    """The authors' generator (1,051,145 parameters at z_dim 100, hidden 128, 32x32 images)."""

    def __init__(self, z_dim=100, hidden=128, init_size=8):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(z_dim, hidden * init_size ** 2),
            View((-1, hidden, init_size, init_size)),
            nn.BatchNorm2d(hidden),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(hidden, hidden, 3, stride=1, padding=1),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(hidden, hidden // 2, 3, stride=1, padding=1),
            nn.BatchNorm2d(hidden // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(hidden // 2, 3, 3, stride=1, padding=1),
            nn.BatchNorm2d(3, affine=True),
        )

    def forward(self, z):
        return self.layers(z)


def parse_arch(arch):
    """'WRN-40-2' -> (40, 2)."""
    parts = arch.split('-')
    if len(parts) != 3 or parts[0] != 'WRN':
        raise ValueError(f"architecture {arch!r} is not of the form 'WRN-<depth>-<width>'")
    return int(parts[1]), int(parts[2])


def build_wide_resnet(arch, num_classes=10, base_width=16):
    depth, width = parse_arch(arch)
    return WideResNet(depth, num_classes, width, base_width)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# The iteration, as the authors' solver.py runs it.

def kl_divergence(student_logits, teacher_logits, temperature=1.0):
    """F.kl_div(log_softmax(s), softmax(t)) with the 'mean' reduction the authors relied on: an
    average over batch * classes. Written as ``reduction='none'`` + ``mean()`` (same value, same
    work) only to avoid torch's warning about that reduction."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1),
                    F.softmax(teacher_logits / temperature, dim=1), reduction='none').mean()


def attention(x):
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def attention_diff(x, y):
    return (attention(x) - attention(y)).pow(2).mean()


class AuthorsIteration:
    """Holds the three networks, the optimisers and schedulers; ``__call__`` runs one iteration
    (n_g generator updates, then n_s student updates), the way solver.ZeroShotKTSolver.run does."""

    def __init__(self, teacher_arch='WRN-40-2', student_arch='WRN-16-1', base_width=16,
                 teacher_base_width=None, student_base_width=None, num_classes=10,
                 batch_size=128, z_dim=100, generator_hidden=128, n_g=1, n_s=10, beta=250.0,
                 generator_lr=1e-3, student_lr=2e-3, num_iterations=50_000, grad_clip=5.0,
                 device='cpu', seed=0):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.teacher = build_wide_resnet(teacher_arch, num_classes,
                                         teacher_base_width or base_width).to(self.device)
        self.student = build_wide_resnet(student_arch, num_classes,
                                         student_base_width or base_width).to(self.device)
        self.generator = Generator(z_dim, generator_hidden).to(self.device)
        # As in the authors' solver: eval() only; the teacher's parameters still require grad.
        self.teacher.eval()
        self.student.train()
        self.generator.train()
        self.optimizer_generator = torch.optim.Adam(self.generator.parameters(), lr=generator_lr)
        self.scheduler_generator = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer_generator, num_iterations)
        self.optimizer_student = torch.optim.Adam(self.student.parameters(), lr=student_lr)
        self.scheduler_student = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer_student, num_iterations)
        self.batch_size, self.z_dim, self.n_g, self.n_s = batch_size, z_dim, n_g, n_s
        self.beta, self.grad_clip = beta, grad_clip

    def __call__(self):
        # LearnableLoader draws a new z every n_g + n_s calls and runs the generator at each call.
        z = torch.randn((self.batch_size, self.z_dim), device=self.device)
        for _ in range(self.n_g):
            # grads for G, and (the authors' extra work) for S's and T's weights as well
            generator_loss = self.generator_update(z)
        for i in range(self.n_s):
            x_pseudo = self.generator(z)  # not detached: the backward below goes through G
            if i == 0:
                with torch.no_grad():  # once per iteration: teacher and x_pseudo are fixed
                    teacher_logits, *teacher_activations = self.teacher(x_pseudo)
            student_loss = self.student_update(x_pseudo, teacher_logits, teacher_activations)
        self.scheduler_student.step()
        self.scheduler_generator.step()
        return generator_loss.detach(), student_loss.detach()

    def generator_update(self, z):
        """One generator update: maximise KL(T || S) on G(z), Adam after gradient clipping."""
        x_pseudo = self.generator(z)
        student_logits, *_ = self.student(x_pseudo)
        teacher_logits, *_ = self.teacher(x_pseudo)
        generator_loss = -kl_divergence(student_logits, teacher_logits)
        self.optimizer_generator.zero_grad()
        generator_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.grad_clip)
        self.optimizer_generator.step()
        return generator_loss

    def student_update(self, x_pseudo, teacher_logits, teacher_activations):
        """One student update: KL + beta * attention transfer, Adam after gradient clipping."""
        student_logits, *student_activations = self.student(x_pseudo)
        student_loss = kl_divergence(student_logits, teacher_logits)
        if self.beta > 0:
            for s, t in zip(student_activations, teacher_activations):
                student_loss = student_loss + self.beta * attention_diff(s, t)
        self.optimizer_student.zero_grad()
        student_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.optimizer_student.step()
        return student_loss

    def synchronize(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)


class SameWorkIteration(AuthorsIteration):
    """The same iteration doing the work zskt_jax's does: the teacher frozen (no weight
    gradients), the student's weights left out of the generator update's backward, the images
    and the teacher's outputs computed once for the n_s student updates, detached, so no
    gradient is taken and thrown away. A PyTorch user writing the method efficiently would run
    this; the ratio against it separates the framework from the authors' extra work."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher.requires_grad_(False)

    def __call__(self):
        z = torch.randn((self.batch_size, self.z_dim), device=self.device)
        self.student.requires_grad_(False)  # the generator update needs no student gradients
        for _ in range(self.n_g):
            generator_loss = self.generator_update(z)
        self.student.requires_grad_(True)
        with torch.no_grad():  # G and T are fixed during the student updates
            x_pseudo = self.generator(z)
            teacher_logits, *teacher_activations = self.teacher(x_pseudo)
        for _ in range(self.n_s):
            student_loss = self.student_update(x_pseudo, teacher_logits, teacher_activations)
        self.scheduler_student.step()
        self.scheduler_generator.step()
        return generator_loss.detach(), student_loss.detach()


ITERATIONS = {'authors': AuthorsIteration, 'same': SameWorkIteration}


def count_iteration_flops(iteration):
    """FLOPs of one iteration by torch.utils.flop_counter (convolutions and matmuls, forward and
    backward, 2 per multiply-add; elementwise ops, BatchNorm and Adam are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        iteration()
    iteration.synchronize()
    return int(counter.get_total_flops())


def peak_memory(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
    # VmHWM: this process's own peak RSS. (ru_maxrss survives fork + exec on Linux, so when
    # benchmarks/iteration.py starts this file it would report the JAX parent's peak.)
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024, 'process peak RSS (VmHWM, /proc/self/status)'
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if platform.system() == 'Darwin' else 1024
    return rss * scale, 'process max RSS (resource.getrusage)'


def cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run(teacher_arch='WRN-40-2', student_arch='WRN-16-1', base_width=16, batch_size=128,
        generator_hidden=128, n_g=1, n_s=10, beta=250.0, repeats=5, warmup=1, device='auto',
        threads=None, count_flops=True, num_classes=10, z_dim=100, log=print,
        teacher_base_width=None, student_base_width=None, work='authors'):
    """Times the authors' iteration (``work='authors'``) or the same-work one (``'same'``);
    returns a dict of results (seconds per iteration, ...)."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    threads = threads or cpu_count()
    torch.set_num_threads(threads)
    iteration = ITERATIONS[work](teacher_arch, student_arch, base_width,
                                 teacher_base_width=teacher_base_width,
                                 student_base_width=student_base_width, num_classes=num_classes,
                                 batch_size=batch_size, z_dim=z_dim,
                                 generator_hidden=generator_hidden, n_g=n_g, n_s=n_s, beta=beta,
                                 device=device)
    for _ in range(warmup):
        iteration()
        iteration.synchronize()
    times = []
    for k in range(repeats):
        start = time.perf_counter()
        iteration()
        iteration.synchronize()
        times.append(time.perf_counter() - start)
        log(f'  [torch] iteration {k + 1}/{repeats}: {times[-1]:.3f} s')
    # Measured after the timed iterations, so that the counter's overhead is not timed.
    flops = count_iteration_flops(iteration) if count_flops else None
    memory, memory_source = peak_memory(iteration.device)
    return {
        'framework': 'pytorch', 'work': work, 'torch_version': torch.__version__,
        'device': str(iteration.device),
        'threads': threads, 'teacher': teacher_arch, 'student': student_arch,
        'teacher_base_width': teacher_base_width or base_width,
        'student_base_width': student_base_width or base_width,
        'generator_hidden': generator_hidden, 'batch_size': batch_size,
        'n_g': n_g, 'n_s': n_s, 'dtype': 'float32', 'repeats': repeats, 'warmup': warmup,
        'times_s': times, 'seconds_per_iteration': statistics.median(times),
        'flops_per_iteration': flops,
        'flops_source': 'torch.utils.flop_counter.FlopCounterMode (conv + matmul only)',
        'peak_memory_bytes': memory, 'peak_memory_source': memory_source,
        'parameters': {'teacher': count_parameters(iteration.teacher),
                       'student': count_parameters(iteration.student),
                       'generator': count_parameters(iteration.generator)},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--teacher', default='WRN-40-2')
    parser.add_argument('--student', default='WRN-16-1')
    parser.add_argument('--base_width', type=int, default=16, help='WRN stem width (paper: 16)')
    parser.add_argument('--teacher_base_width', type=int, default=0, help='0: --base_width')
    parser.add_argument('--student_base_width', type=int, default=0, help='0: --base_width')
    parser.add_argument('--generator_hidden', type=int, default=128)
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--n_g', type=int, default=1)
    parser.add_argument('--n_s', type=int, default=10)
    parser.add_argument('--beta', type=float, default=250.0)
    parser.add_argument('--num_classes', type=int, default=10)
    parser.add_argument('--z_dim', type=int, default=100)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--device', default='auto', help="auto (cuda if available) | cpu | cuda")
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: every core)')
    parser.add_argument('--no_flops', action='store_true', help='skip the FLOP count')
    parser.add_argument('--work', choices=sorted(ITERATIONS), default='authors',
                        help="authors: their iteration's work; same: the work zskt_jax does")
    parser.add_argument('--json_out', default='', help='write the results here as JSON')
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)
    result = run(args.teacher, args.student, args.base_width, args.batch_size,
                 args.generator_hidden, args.n_g, args.n_s, args.beta, args.repeats, args.warmup,
                 args.device, args.threads or None, not args.no_flops, args.num_classes,
                 args.z_dim, log, args.teacher_base_width or None,
                 args.student_base_width or None, args.work)
    log(f"  [torch] {result['seconds_per_iteration']:.3f} s/it (median of {args.repeats}), "
        f"{result['threads']} threads on {result['device']}")
    if args.json_out:
        with open(args.json_out, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
