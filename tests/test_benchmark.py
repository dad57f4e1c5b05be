"""benchmarks/: the iteration benchmark runs end to end (JAX and the PyTorch baseline) and prints
what it promises; the baseline's networks are the paper's. Speed is never asserted in a test."""
import json
import os
import re
import subprocess
import sys
import tempfile

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


# Top-level modules of benchmarks/prepare_device.py's DEVICE_PACKAGES (googleapis-common-protos
# is left out: its `google` namespace also holds protobuf, which the GPU image has).
DEVICE_MODULES = ('ml_collections,clu,tensorflow_datasets,array_record,tree,promise,simple_parsing,'
                  'docstring_parser,tensorflow_metadata,immutabledict,toml,termcolor,'
                  'importlib_resources')


def test_gpu_check_quick_runs_as_on_the_gpu_image(tmp_path):
    """benchmarks/prepare_device.py, then benchmarks/gpu_check.py --quick --device_dir as on the
    GPU image: TensorFlow cannot be imported and the packages the image lacks are found only in
    the wheels the check installs (tests/device_like/sitecustomize.py hides this machine's
    copies), so the digits are read from the prepared array_record data without TensorFlow.
    Every part: each iteration variant, the upsampling layers and a digits run from a teacher it
    trains, in one JSON."""
    pytest.importorskip('torch')
    device_dir = tmp_path / 'device'
    version = f'{sys.version_info.major}.{sys.version_info.minor}'
    prepared = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'prepare_device.py'),
                               f'--out={device_dir}', f'--python_version={version}'],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    assert 'digits/16x16: 1797 examples, array_record' in prepared.stdout

    out = tmp_path / 'gpu_check.json'
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, 'tests', 'device_like'),
               ZSKT_HIDE_FROM_SITE=DEVICE_MODULES)
    env.pop('TFDS_DATA_DIR', None)
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--quick',
                             f'--device_dir={device_dir}', f'--out={out}'], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report['tensorflow_installed'] is False
    assert report['tensorflow_datasets_from'].startswith(tempfile.gettempdir())
    parts = report['parts']
    variants = {name: parts[name] for name in ('float32', 'bfloat16', 'unrolled', 'num_seeds_3')}
    resnet = parts['resnet34_resnet18_b256']
    assert resnet['jax']['seconds_per_iteration'] > 0 and resnet['torch'] is None
    float32_output = result.stdout.split('== float32 ==')[1].split('== resnet34_resnet18_b256 ==')[0]
    check_iteration_output(float32_output, variants['float32'])
    assert [variants[v]['jax']['compute_dtype'] for v in variants] == [
        'float32', 'bfloat16', 'float32', 'float32']
    assert variants['num_seeds_3']['images_per_iteration'] == 3 * 16 * (1 + 2)
    assert variants['unrolled']['jax']['update_loop'] == 'unroll'
    assert all(variants[v]['jax']['seconds_per_iteration'] > 0 for v in variants)
    assert variants['bfloat16']['torch'] is None  # PyTorch only beside float32
    [layer] = parts['upsample_conv3x3']
    assert layer['upsample_conv3x3_s'] > 0 and layer['upsample_then_conv_s'] > 0
    digits, seeds = parts['digits_default'], parts['digits_default_seeds_1_4']
    assert 0 <= digits['student_accuracy'] <= 1 and digits['wall_time_s_with_teacher'] > 0
    assert digits['seeds'] == [0] and seeds['seeds'] == [1]  # --quick: one seed
    assert seeds['teacher_accuracy'] == digits['teacher_accuracy']
    assert result.stdout.count('teacher_digits.py') == 1  # the seeds reuse the default's teacher
    assert report['backend'] == 'cpu' and report['quick']


def test_gpu_check_records_a_failed_part_and_goes_on(tmp_path):
    """A part that fails (here: the digits cannot be prepared) is written to the JSON with its
    error, the next part still runs, and the exit status says that something failed; parts past
    --budget_s are recorded as skipped; an unknown part is refused before anything runs."""
    def gpu_check(*flags, **env):
        return subprocess.run([sys.executable, os.path.join(BENCHMARKS, 'gpu_check.py'), '--quick',
                               *flags], cwd=ROOT, env=dict(os.environ, **env),
                              capture_output=True, text=True, timeout=300)

    out = tmp_path / 'gpu_check.json'
    result = gpu_check(f'--out={out}', '--parts=upsample_conv3x3,nonexistent')
    assert result.returncode != 0 and "unknown part(s) 'nonexistent'" in result.stderr
    assert not out.exists()  # refused before any part ran

    result = gpu_check(f'--out={out}', '--parts=digits_default,upsample_conv3x3',
                       TFDS_DATA_DIR='/proc/no_such_dir')
    assert result.returncode == 1 and 'FAILED: digits_default' in result.stdout, result.stdout
    parts = json.loads(out.read_text())['parts']
    assert 'teacher failed (2)' in parts['digits_default']['error'], parts
    assert 'could not be prepared' in parts['digits_default']['error']
    assert parts['upsample_conv3x3'][0]['upsample_conv3x3_s'] > 0

    result = gpu_check(f'--out={out}', '--parts=digits_default', '--budget_s=0')
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'skipped' in json.loads(out.read_text())['parts']['digits_default']


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


def test_iteration_benchmark_starts_from_another_config():
    """benchmarks/iteration.py --config times another config's iteration (the digits default's,
    stabilisers and replay memory included) with the flags applied on top; JAX only, since the
    PyTorch baselines are the paper's iteration; a missing file is named."""
    sys.path.insert(0, BENCHMARKS)
    try:
        import iteration
    finally:
        sys.path.remove(BENCHMARKS)
    args = iteration.parse_args(['--config', 'configs/digits.py', '--skip_torch', '--n_s', '2'])
    config = iteration.build_config(args)
    assert (config.dataset, config.n_s, config.replay_batch) == ('digits16', 2, 128)
    assert config.student_augment == 'crop' and config.bn_weight > 0
    with pytest.raises(SystemExit):  # argparse's error: add --skip_torch
        iteration.parse_args(['--config', 'configs/digits.py'])
    with pytest.raises(SystemExit, match="--config: config file 'configs/nope.py' does not exist"):
        iteration.build_config(iteration.parse_args(['--config', 'configs/nope.py',
                                                     '--skip_torch']))
