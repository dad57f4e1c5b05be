"""The zju-vipa/CMI toolbox's CIFAR classifiers (github.com/zju-vipa/CMI,
datafree/models/classifiers/resnet.py, vgg.py, wresnet.py): parameter counts, forward parity
with PyTorch and the import of their checkpoints, and the model registry.

The PyTorch networks below are written from the toolbox's definitions: the CIFAR ResNet
(DAFL's: 3x3 stem, no max-pool, post-activation BasicBlocks, ``linear`` head) and VGG-11 with
BatchNorm (RepDistiller's: five blocks, biased convs, the last ReLU of each block applied in
``forward``, pools after blocks 0-2 and after block 3 only at 64x64, global average pool,
one ``classifier`` Linear). PyTorch is a test dependency; these tests skip without it.
"""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch is not installed (pip install torch==2.13.0, '
                            'listed in requirements-test.txt); the parity tests need it')
nn = torch.nn
F = torch.nn.functional

from zskt_jax import checkpoints, import_torch  # noqa: E402
from zskt_jax.errors import ConfigError  # noqa: E402
from zskt_jax.models import registry  # noqa: E402
from test_import_torch import assert_close, randomize, to_nhwc  # noqa: E402,F401

torch.set_num_threads(1)  # 2 OpenMP threads on a busy 2-core machine run ~30x slower
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# The toolbox's networks, in PyTorch, with a width option (64 in the toolbox).

class TorchBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TorchResNet(nn.Module):
    def __init__(self, num_blocks, num_classes=10, width=64):
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], 1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], 2)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes, n, stride):
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(TorchBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            stages.append(out)
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        return self.linear(out), stages


VGG11_CFG = [[1], [2], [4, 4], [8, 8], [8, 8]]  # cfg "A" / 64


class TorchVGG11(nn.Module):
    def __init__(self, num_classes=10, width=64):
        super().__init__()
        cfg = [[width * m for m in block] for block in VGG11_CFG]
        in_channels = 3
        for b, block in enumerate(cfg):
            layers = []
            for v in block:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                in_channels = v
            setattr(self, f'block{b}', nn.Sequential(*layers[:-1]))
        self.pool = nn.MaxPool2d(2, 2)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x):
        h = x.shape[2]
        stages = []
        for b in range(5):
            x = F.relu(getattr(self, f'block{b}')(x))
            stages.append(x)
            if b < 3 or (b == 3 and h == 64):
                x = self.pool(x)
        x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return self.classifier(x), stages


def torch_model(arch, num_classes=10, width=64):
    if arch == 'vgg11':
        return TorchVGG11(num_classes, width)
    return TorchResNet({'resnet18': [2, 2, 2, 2], 'resnet34': [3, 4, 6, 3]}[arch], num_classes,
                       width)


def numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


TINY = {'resnet18': 8, 'resnet34': 4, 'vgg11': 8}  # widths that keep the tests fast


# ----------------------------------------------------------------------------------------------
# Parameter counts (full size; no forward pass)

@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'vgg11'])
@pytest.mark.parametrize('num_classes', [10, 100])
def test_parameter_counts_equal_pytorch(arch, num_classes):
    variables = jax.eval_shape(registry.build(arch, num_classes).init, jax.random.key(0),
                               jnp.zeros((1, 32, 32, 3)))
    expected = sum(p.numel() for p in torch_model(arch, num_classes).parameters())
    assert count(variables['params']) == expected
    buffers = sum(b.numel() for name, b in torch_model(arch, num_classes, width=4).named_buffers()
                  if not name.endswith('num_batches_tracked'))
    small = jax.eval_shape(registry.build(arch, num_classes, width=4).init, jax.random.key(0),
                           jnp.zeros((1, 32, 32, 3)))
    assert count(small['batch_stats']) == buffers


def test_toolbox_published_counts():
    """The toolbox's figures for CIFAR-10."""
    counts = {arch: count(jax.eval_shape(registry.build(arch, 10).init, jax.random.key(0),
                                         jnp.zeros((1, 32, 32, 3)))['params'])
              for arch in ('resnet18', 'resnet34')}
    assert counts == {'resnet18': 11_173_962, 'resnet34': 21_282_122}


# ----------------------------------------------------------------------------------------------
# Forward parity through the import's conversion

@pytest.mark.parametrize('arch,image_size', [('resnet18', 32), ('resnet34', 32), ('vgg11', 32),
                                             ('vgg11', 64)])
def test_logits_and_stages_match_pytorch(arch, image_size):
    width = TINY[arch]
    model = randomize(torch_model(arch, 10, width), seed=1).eval()
    variables = import_torch.convert_state_dict(numpy_state_dict(model), arch, 10, width)
    images = np.random.RandomState(0).randn(2, image_size, image_size, 3).astype(np.float32)
    with torch.no_grad():
        expected_logits, expected_stages = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    logits, stages = jax.jit(registry.build(arch, 10, width).apply)(variables, images)
    assert_close(logits, expected_logits.numpy(), what=f'{arch} logits')
    assert len(stages) == len(expected_stages)
    for i, (got, want) in enumerate(zip(stages, expected_stages)):
        assert_close(got, to_nhwc(want), what=f'{arch} stage {i}')
    assert [s.shape[1] for s in stages] == list(registry.stage_sizes(arch, image_size))


def test_training_mode_matches_pytorch():
    """Training-mode BatchNorm: batch statistics in the forward pass, running statistics moved
    with PyTorch's momentum 0.1 and unbiased variance."""
    arch, width = 'resnet18', 4
    model = randomize(torch_model(arch, 10, width), seed=2).train()
    variables = import_torch.convert_state_dict(numpy_state_dict(model), arch, 10, width)
    images = np.random.RandomState(1).randn(4, 32, 32, 3).astype(np.float32)
    expected_logits, _ = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    (logits, _), updated = jax.jit(lambda v, x: registry.build(arch, 10, width).apply(
        v, x, train=True, mutable=['batch_stats']))(variables, images)
    assert_close(logits, expected_logits.detach().numpy(), what='training-mode logits')
    want = import_torch.convert_state_dict(numpy_state_dict(model), arch, 10, width)
    for (path, got), (_, expected) in zip(
            jax.tree_util.tree_flatten_with_path(updated['batch_stats'])[0],
            jax.tree_util.tree_flatten_with_path(want['batch_stats'])[0]):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))


def test_init_follows_pytorch_and_toolbox():
    """ResNet: PyTorch's default init (the toolbox sets none): U(+-1/sqrt(fan_in)). VGG: the
    toolbox's _initialize_weights: conv N(0, sqrt(2/(9*out))), biases 0, linear N(0, 0.01)."""
    resnet = registry.build('resnet18', 10, width=16).init(jax.random.key(0),
                                                           jnp.zeros((1, 32, 32, 3)))['params']
    kernel = np.asarray(resnet['layer3_0']['conv2']['kernel'])  # 3x3x64x64
    bound = 1 / np.sqrt(9 * 64)
    assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.99 * bound
    bias = np.asarray(resnet['linear']['bias'])
    assert np.abs(bias).max() <= 1 / np.sqrt(128) and np.any(bias != 0)
    vgg = registry.build('vgg11', 10, width=16).init(jax.random.key(0),
                                                     jnp.zeros((1, 32, 32, 3)))['params']
    kernel = np.asarray(vgg['block3_3']['kernel'])  # 3x3x128x128
    assert abs(kernel.std() - np.sqrt(2 / (9 * 128))) < 0.03 * np.sqrt(2 / (9 * 128))
    assert np.all(np.asarray(vgg['block3_3']['bias']) == 0)
    assert abs(np.asarray(vgg['classifier']['kernel']).std() - 0.01) < 0.001
    assert np.all(np.asarray(vgg['block3_4']['scale']) == 1)


# ----------------------------------------------------------------------------------------------
# The import command

def run_import(*args):
    return subprocess.run([sys.executable, '-m', 'zskt_jax.import_torch', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'vgg11'])
def test_command_imports_toolbox_checkpoint(arch, tmp_path):
    width = TINY[arch]
    model = randomize(torch_model(arch, 100, width), seed=3).eval()
    path = tmp_path / f'cifar100_{arch}.pth'
    # The toolbox's format: {'state_dict': ..., ...}; the file of a DataParallel model.
    torch.save({'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                'best_acc1': 0.7}, path)
    out = tmp_path / 'teacher'
    result = run_import(f'--checkpoint={path}', f'--arch={arch}', '--dataset=cifar100',
                        f'--width={width}', f'--out={out}', '--no_eval')
    assert result.returncode == 0, result.stderr[-3000:]
    assert f'{arch} teacher for cifar100 written to {out}' in result.stdout

    variables, meta = checkpoints.load_teacher(str(out))
    assert meta['arch'] == arch and meta['base_width'] == width and meta['num_classes'] == 100
    images = np.random.RandomState(2).randn(2, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))[0].numpy()
    logits, _ = jax.jit(registry.build(arch, 100, width).apply)(variables, images)
    assert_close(logits, expected, what=f'{arch} logits after the import')


def test_toolbox_wrn_name_imports_as_the_projects_wrn(tmp_path):
    """The toolbox's wrn16_1 is the authors' WRN-16-1, state-dict keys included (its
    wresnet.py is theirs): imported under the project's name, where the zero-shot job looks."""
    from test_import_torch import torch_wrn
    state_dict = torch_wrn('WRN-16-1', seed=4).state_dict()
    torch.save({'state_dict': state_dict}, tmp_path / 'wrn.pth')
    out = tmp_path / 'teacher'
    assert import_torch.main([f'--checkpoint={tmp_path / "wrn.pth"}', '--arch=wrn16_1',
                              '--dataset=cifar10', f'--out={out}', '--no_eval']) == 0
    variables, meta = checkpoints.load_teacher(str(out))
    assert meta['arch'] == 'WRN-16-1' and meta['base_width'] == 16
    reference = import_torch.convert_state_dict(
        {k: v.numpy() for k, v in state_dict.items()}, 'WRN-16-1', 10)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('arch', ['WRN-16-1', 'WRN-16-2', 'WRN-40-1', 'WRN-40-2'])
def test_derived_layout_is_the_wrn_table(arch):
    """The key layout derived from the Flax model is, for the WRNs, exactly the hand-written
    table of the authors' keys (names, shapes, order), which the toolbox's wresnet.py shares."""
    assert import_torch.flax_layout(arch, 10) == import_torch.torch_layout(arch, 10)
    assert import_torch.flax_layout(registry.canonical_name(
        'wrn' + arch[4:].replace('-', '_')), 10) == import_torch.torch_layout(arch, 10)


def test_wrong_architecture_and_missing_key_messages():
    resnet18 = numpy_state_dict(torch_model('resnet18', 10, 4))
    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict(resnet18, 'resnet34', 10, 4)
    assert 'missing keys: layer1.2.conv1.weight' in str(error.value)
    assert 'It looks like a resnet18 of width 4: try --arch=resnet18 --width=4' in str(error.value)

    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict(resnet18, 'resnet18', 100, 4)
    assert ('first mismatching tensor linear.weight: expected shape (100, 32), found (10, 32)'
            in str(error.value))

    del resnet18['layer2.0.shortcut.1.running_var']
    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict(resnet18, 'resnet18', 10, 4)
    assert 'missing keys: layer2.0.shortcut.1.running_var' in str(error.value)
    assert 'unexpected' not in str(error.value)

    vgg = numpy_state_dict(torch_model('vgg11', 10, 4))
    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict(vgg, 'resnet18', 10, 4)
    message = str(error.value)
    assert "None of its keys is one of resnet18's." in message
    assert 'unexpected keys: block0.0.weight, block0.0.bias' in message
    assert 'try --arch=vgg11 --width=4' in message


def test_command_wrong_architecture_exits_2_without_traceback(tmp_path):
    torch.save({'state_dict': torch_model('resnet18', 10, 4).state_dict()}, tmp_path / 'r.pth')
    out = tmp_path / 'teacher'
    result = run_import(f'--checkpoint={tmp_path / "r.pth"}', '--arch=vgg11', '--width=4',
                        '--dataset=cifar10', f'--out={out}', '--no_eval')
    assert result.returncode == 2, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert 'is not a vgg11 with 10 classes (base width 4)' in result.stderr
    assert 'missing keys: block0.0.weight' in result.stderr
    assert 'try --arch=resnet18 --width=4' in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# The registry

def test_registry_names_build_and_stages():
    assert {'resnet18', 'resnet34', 'vgg11', 'wrn16_1', 'wrn40_2', 'WRN-40-2'} <= set(
        registry.names())
    for name in registry.names():
        architecture = registry.get(name)
        width = 4
        model = registry.build(name, 10, width=width)
        for size in (32, 64):
            variables = jax.eval_shape(model.init, jax.random.key(0),
                                       jnp.zeros((1, size, size, 3)))
            _, stages = jax.eval_shape(model.apply, variables, jnp.zeros((1, size, size, 3)))
            declared = registry.stages(name, size, width)
            assert [(s.shape[1], s.shape[2], s.shape[3]) for s in stages] == [
                (d.size, d.size, d.channels) for d in declared], (name, size)
        assert registry.stages(name, 32)[0].channels == (
            architecture.default_width * (1 if architecture.family != 'wrn' else int(
                architecture.name.split('-')[2])))
    assert [s.size for s in registry.stages('resnet34', 32)] == [32, 16, 8, 4]
    assert [s.size for s in registry.stages('vgg11', 32)] == [32, 16, 8, 4, 4]
    assert [s.name for s in registry.stages('wrn40_2', 32)] == ['block1', 'block2', 'block3']
    assert registry.build('wrn40_2', 10) == registry.build('WRN-40-2', 10)
    assert registry.build('WRN-40-2', 10, base_width=8).base_width == 8
    assert registry.build('resnet18', 10).width == 64 and registry.build('vgg11', 10).width == 64
    with pytest.raises(ConfigError, match="unknown architecture 'resnet50'.*resnet18"):
        registry.build('resnet50', 10)
    with pytest.raises(ConfigError, match='depth must be 6n'):
        registry.build('wrn15_1', 10)
