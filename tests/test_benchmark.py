"""benchmarks/: the iteration benchmark runs end to end (JAX and the PyTorch baseline) and prints
what it promises; the baseline's networks are the paper's. Speed is never asserted in a test."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

BENCHMARKS = os.path.join(ROOT, 'benchmarks')


def check_iteration_output(out, report):
    """benchmarks/iteration.py --quick's output and result, float32 with both PyTorch loops."""
    # One s/it, images/s, FLOP/it and peak-memory line per iteration timed: JAX, PyTorch as the
    # authors run it, PyTorch doing the same work as JAX.
    assert len(re.findall(r'^  s/it: \d+\.\d+ \(median of 2;', out, re.M)) == 3, out
    assert len(re.findall(r'^  images/s: \d+\.\d+$', out, re.M)) == 3, out
    assert len(re.findall(r'^  FLOP/it: \d+\.\d+ [GT]FLOP \(', out, re.M)) == 3, out
    assert len(re.findall(r'^  FLOP/s: \d+\.\d+ GFLOP/s', out, re.M)) == 3, out
    assert len(re.findall(r'^  peak memory: \d+\.\d+ GiB \(', out, re.M)) == 3, out
    assert 'images/s = generated images consumed per second' in out
    assert re.search(r"^ratio: JAX speed-up over PyTorch = \d+\.\d+x against the authors' "
                     r'iteration, \d+\.\d+x against the same work', out, re.M), out
    assert re.search(r'^FLOP ratio: PyTorch / JAX = \d+\.\d+x', out, re.M), out

    assert report['images_per_iteration'] == 16 * (1 + 2)  # batch 16, n_g 1, n_s 2 (--quick)
    for framework in ('jax', 'torch', 'torch_same_work'):
        assert len(report[framework]['times_s']) == 2
        assert report[framework]['flops_per_iteration'] > 0
    assert (report['torch']['work'], report['torch_same_work']['work']) == ('authors', 'same')
    assert report['jax']['metrics_finite']
    # The authors' iteration does more work than ours: the generator is re-run (and
    # back-propagated through) at every update, and teacher weight gradients are taken.
    assert report['torch']['flops_per_iteration'] > report['jax']['flops_per_iteration']
    assert (report['torch']['flops_per_iteration']
            > report['torch_same_work']['flops_per_iteration'])


def test_gpu_check_quick_mode_measures_every_part(tmp_path):
    """benchmarks/gpu_check.py --quick on CPU: every iteration variant, the upsampling layers and
    a digits run from a teacher it trains, in one JSON."""
    pytest.importorskip('torch')
    out = tmp_path / 'gpu_check.json'
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--quick',
                             f'--out={out}'], cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    variants = report['iteration']
    assert list(variants) == ['float32', 'bfloat16', 'num_seeds_3', 'unrolled']
    float32_output = result.stdout.split('== iteration benchmark: bfloat16 ==')[0]
    check_iteration_output(float32_output, variants['float32'])
    assert [variants[v]['jax']['compute_dtype'] for v in variants] == [
        'float32', 'bfloat16', 'float32', 'float32']
    assert variants['num_seeds_3']['images_per_iteration'] == 3 * 16 * (1 + 2)
    assert variants['unrolled']['jax']['update_loop'] == 'unroll'
    assert all(variants[v]['jax']['seconds_per_iteration'] > 0 for v in variants)
    assert variants['bfloat16']['torch'] is None  # PyTorch only beside float32
    [layer] = report['upsample_conv3x3']
    assert layer['upsample_conv3x3_s'] > 0 and layer['upsample_then_conv_s'] > 0
    digits = report['digits']['digits_default']
    assert 0 <= digits['student_accuracy'] <= 1 and digits['wall_time_s_with_teacher'] > 0
    assert report['backend'] == 'cpu' and report['quick']


def import_torch_baseline():
    """(torch on one thread, benchmarks/torch_baseline.py), or skip where torch is missing."""
    torch = pytest.importorskip('torch')
    sys.path.insert(0, BENCHMARKS)
    try:
        import torch_baseline
    finally:
        sys.path.remove(BENCHMARKS)
    torch.set_num_threads(1)
    return torch, torch_baseline


def test_torch_baseline_networks_have_the_papers_parameter_counts():
    _, torch_baseline = import_torch_baseline()
    # docs/method.md, sections "WideResNet" and "Generator".
    expected = {'WRN-16-1': 175_066, 'WRN-16-2': 691_674, 'WRN-40-1': 563_930,
                'WRN-40-2': 2_243_546}
    for arch, count in expected.items():
        assert torch_baseline.count_parameters(torch_baseline.build_wide_resnet(arch)) == count
    assert torch_baseline.count_parameters(torch_baseline.Generator()) == 1_051_145


def test_torch_baseline_keeps_the_authors_extra_work():
    """The costs docs/method.md lists (section "The authors' loop and its cost"): teacher weights
    get gradients in the generator update, the student updates back-propagate into the generator,
    the teacher runs once for them."""
    torch, torch_baseline = import_torch_baseline()
    iteration = torch_baseline.AuthorsIteration(
        'WRN-10-1', 'WRN-10-1', base_width=4, batch_size=4, generator_hidden=8, n_g=1, n_s=2)
    teacher_calls = []
    iteration.teacher.register_forward_hook(lambda *_: teacher_calls.append(torch.is_grad_enabled()))
    generator_calls = []
    iteration.generator.register_forward_hook(lambda *_: generator_calls.append(1))
    after_generator_step = {}
    iteration.optimizer_generator.register_step_post_hook(lambda *_: after_generator_step.update(
        {name: p.grad.clone() for name, p in iteration.generator.named_parameters()}))
    iteration()
    assert all(p.requires_grad for p in iteration.teacher.parameters())
    assert all(p.grad is not None for p in iteration.teacher.parameters())  # never zeroed
    assert teacher_calls == [True, False]  # generator update with grad, then once under no_grad
    assert len(generator_calls) == 3  # n_g + n_s generator forwards
    # The student backwards went through the generator: its gradients changed after its step
    # (they are left there unused, until the next generator update zeroes them).
    for name, p in iteration.generator.named_parameters():
        if name.endswith('weight') and p.dim() > 1:
            assert not torch.equal(p.grad, after_generator_step[name]), name


def test_torch_same_work_iteration_does_what_jax_does():
    """Teacher frozen, no student weight gradients in the generator update, images and teacher
    outputs once for the student updates, no gradient into the generator from them."""
    torch, torch_baseline = import_torch_baseline()
    iteration = torch_baseline.SameWorkIteration(
        'WRN-10-1', 'WRN-10-1', base_width=4, batch_size=4, generator_hidden=8, n_g=1, n_s=2)
    teacher_calls, generator_calls = [], []
    iteration.teacher.register_forward_hook(lambda *_: teacher_calls.append(torch.is_grad_enabled()))
    iteration.generator.register_forward_hook(
        lambda *_: generator_calls.append(torch.is_grad_enabled()))
    student_grads_at_generator_step = []
    iteration.optimizer_generator.register_step_post_hook(
        lambda *_: student_grads_at_generator_step.extend(
            p.grad for p in iteration.student.parameters()))
    after_generator_step = {}
    iteration.optimizer_generator.register_step_post_hook(lambda *_: after_generator_step.update(
        {name: p.grad.clone() for name, p in iteration.generator.named_parameters()}))
    iteration()
    assert all(p.grad is None and not p.requires_grad for p in iteration.teacher.parameters())
    assert all(g is None for g in student_grads_at_generator_step)
    assert teacher_calls == [True, False]      # generator update, then once under no_grad
    assert generator_calls == [True, False]    # n_g updates, then once for the n_s updates
    for name, p in iteration.generator.named_parameters():  # untouched by the student updates
        assert torch.equal(p.grad, after_generator_step[name]), name
    assert all(p.grad is not None for p in iteration.student.parameters())
