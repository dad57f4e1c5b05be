"""Parity with the authors' PyTorch code: importing their teachers, and one zero-shot iteration.

The PyTorch networks below are written from docs/method.md's description of the authors' code (the
WideResNet with its pre-activation BasicBlock / NetworkBlock, and the generator), and the
PyTorch iteration is the authors' loop: Adam, clip_grad_norm_(5), loss_G = -KL averaged over
B * C, loss_S = KL + beta * AT with their attention maps. PyTorch is only a test dependency
(requirements-test.txt); these tests skip, saying so, where it is not installed.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip('torch', reason='PyTorch is not installed (pip install torch==2.13.0, '
                            'listed in requirements-test.txt); the parity tests need it')
nn = torch.nn
F = torch.nn.functional

from zskt_jax import checkpoints, import_torch, losses, parallel, zero_shot  # noqa: E402
from zskt_jax.models import Generator, build_wide_resnet  # noqa: E402
from zskt_jax.state import TrainState, adam  # noqa: E402

torch.set_num_threads(1)  # 2 OpenMP threads on a busy 2-core machine run ~30x slower


# ----------------------------------------------------------------------------------------------
# The authors' networks, in PyTorch (docs/method.md, sections "WideResNet" and "Generator").

class BasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (None if self.equalInOut
                             else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False))

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class TorchWideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor):
        super().__init__()
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]

    def forward(self, x):
        out = self.conv1(x)
        out = self.block1(out)
        activation1 = out
        out = self.block2(out)
        activation2 = out
        out = self.block3(out)
        activation3 = out
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.nChannels)
        return self.fc(out), activation1, activation2, activation3


class TorchGenerator(nn.Module):
    def __init__(self, z_dim=100, init_size=8):
        super().__init__()
        self.init_size = init_size
        self.l1 = nn.Linear(z_dim, 128 * init_size ** 2)
        self.bn0 = nn.BatchNorm2d(128)
        self.conv1 = nn.Conv2d(128, 128, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(128)
        self.conv2 = nn.Conv2d(128, 64, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 3, 3, 1, 1)
        self.bn3 = nn.BatchNorm2d(3, affine=True)

    def forward(self, z):
        out = self.l1(z.view(z.shape[0], -1))
        out = out.view(out.shape[0], -1, self.init_size, self.init_size)
        img = F.interpolate(self.bn0(out), scale_factor=2)
        img = F.leaky_relu(self.bn1(self.conv1(img)), 0.2)
        img = F.interpolate(img, scale_factor=2)
        img = F.leaky_relu(self.bn2(self.conv2(img)), 0.2)
        return self.bn3(self.conv3(img))


def randomize(module, seed):
    """Random weights AND random BatchNorm statistics/affine parameters, so that every tensor of
    the state dict matters to the comparison."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator)
                               * np.sqrt(2.0 / fan_in))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
    return module


def to_nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def assert_close(actual, expected, rtol=1e-4, what=''):
    """Relative agreement measured against the tensor's scale (max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = np.max(np.abs(expected))
    error = np.max(np.abs(actual - expected))
    assert error <= rtol * scale, f'{what}: max abs error {error:.3g} > {rtol} * {scale:.3g}'


ARCHS = {'WRN-16-1': (16, 1), 'WRN-16-2': (16, 2), 'WRN-40-1': (40, 1), 'WRN-40-2': (40, 2)}


def torch_wrn(arch, seed=0, num_classes=10):
    depth, width = ARCHS[arch]
    return randomize(TorchWideResNet(depth, num_classes, width), seed).eval()


@pytest.fixture(scope='module')
def images():
    return np.random.RandomState(0).randn(4, 32, 32, 3).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Import

@pytest.mark.parametrize('arch', list(ARCHS))
def test_import_matches_pytorch(arch, images, tmp_path):
    model = torch_wrn(arch, seed=1)
    path = tmp_path / 'last.pth.tar'
    torch.save({'epoch': 200, 'state_dict': model.state_dict(), 'best_acc': 0.9}, path)
    out = tmp_path / 'teacher'
    import_torch.import_teacher(str(path), arch, 'svhn', str(out), evaluate=False)

    variables, meta = checkpoints.load_teacher(str(out))
    assert meta['arch'] == arch and meta['base_width'] == 16 and meta['num_classes'] == 10
    assert meta['dataset'] == 'svhn' and meta['image_shape'] == [32, 32, 3]
    assert meta['source'] == f'pytorch:{os.path.abspath(path)}'
    checkpoints.check_teacher(meta, num_classes=10, image_shape=(32, 32, 3), teacher_arch=arch,
                              teacher_base_width=16, path=str(out))

    with torch.no_grad():
        expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
    logits, activations = jax.jit(build_wide_resnet(arch, 10).apply)(variables, images)
    assert_close(logits, expected[0].numpy(), what=f'{arch} logits')
    for g in range(3):
        assert_close(activations[g], to_nhwc(expected[g + 1]), what=f'{arch} group {g + 1}')


@pytest.mark.parametrize('variant', ['bare', 'module_prefix', 'module_prefix_in_state_dict',
                                     'legacy_serialization'])
def test_import_state_dict_variants(variant, tmp_path):
    model = torch_wrn('WRN-16-1', seed=2)
    state_dict = model.state_dict()
    prefixed = {f'module.{k}': v for k, v in state_dict.items()}
    saved = {'bare': state_dict, 'module_prefix': prefixed,
             'module_prefix_in_state_dict': {'state_dict': prefixed},
             'legacy_serialization': {'state_dict': state_dict, 'epoch': 100}}[variant]
    path = tmp_path / 'last.pth.tar'
    # The authors saved with PyTorch 1.0, before the zip format (PyTorch >= 1.6).
    torch.save(saved, path, _use_new_zipfile_serialization=variant != 'legacy_serialization')
    converted = import_torch.convert_state_dict(import_torch.load_torch_checkpoint(str(path)),
                                                'WRN-16-1', 10)
    # The same variables as from the plain layout (whose forward pass is checked above).
    reference = import_torch.convert_state_dict({k: v.numpy() for k, v in state_dict.items()},
                                                'WRN-16-1', 10)
    assert jax.tree.structure(converted) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(converted), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(got, want)


def test_command_line_default_out_is_where_zero_shot_looks(tmp_path, monkeypatch, capsys):
    from configs import default
    from zskt_jax import common
    model = torch_wrn('WRN-16-2', seed=3, num_classes=100)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'last.pth.tar')
    monkeypatch.chdir(tmp_path)
    # The dataset is not prepared in this empty data dir: the import still succeeds, unevaluated.
    assert import_torch.main(['--checkpoint=last.pth.tar', '--arch=WRN-16-2',
                              '--dataset=cifar100', f'--data_dir={tmp_path / "tfds"}']) == 0
    config = default.get_config()
    config.dataset, config.teacher.arch = 'cifar100', 'WRN-16-2'
    assert common.teacher_dir(config) == 'runs/teacher_cifar100_WRN-16-2/teacher'
    with open(os.path.join(common.teacher_dir(config), 'teacher.json')) as f:
        meta = json.load(f)
    assert meta['num_classes'] == 100 and 'test_accuracy' not in meta
    # ... and the zero-shot job's own loader accepts it.
    common.load_teacher_for(config)
    assert 'written to runs/teacher_cifar100_WRN-16-2/teacher' in capsys.readouterr().out


def test_wrong_architecture_names_first_mismatching_tensor(tmp_path, capsys):
    state_dict = torch_wrn('WRN-40-2').state_dict()
    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict({k: v.numpy() for k, v in state_dict.items()},
                                        'WRN-40-1', 10)
    message = str(error.value)
    # WRN-40-1's block1 is 16 -> 16 channels; WRN-40-2's is 16 -> 32.
    assert ('first mismatching tensor block1.layer.0.conv1.weight: expected shape (16, 16, 3, 3), '
            'found (32, 16, 3, 3)') in message
    assert 'unexpected keys: block1.layer.0.convShortcut.weight' in message
    assert 'try --arch=WRN-40-2' in message

    shallow = torch_wrn('WRN-16-1').state_dict()
    with pytest.raises(import_torch.StateDictMismatchError) as error:
        import_torch.convert_state_dict({k: v.numpy() for k, v in shallow.items()},
                                        'WRN-40-1', 10)
    assert 'missing keys: block1.layer.2.bn1.weight' in str(error.value)
    assert 'try --arch=WRN-16-1' in str(error.value)

    # Through the command: an error line, exit status 1, nothing written.
    torch.save({'state_dict': shallow}, tmp_path / 'last.pth.tar')
    out = tmp_path / 'teacher'
    assert import_torch.main([f'--checkpoint={tmp_path / "last.pth.tar"}', '--arch=WRN-16-2',
                              '--dataset=svhn', f'--out={out}', '--no_eval']) == 1
    err = capsys.readouterr().err
    assert ('first mismatching tensor block1.layer.0.conv1.weight: expected shape (32, 16, 3, 3), '
            'found (16, 16, 3, 3)') in err
    assert not out.exists()


def test_pickled_objects_need_trust(tmp_path):
    state_dict = torch_wrn('WRN-16-1').state_dict()
    path = tmp_path / 'last.pth.tar'
    torch.save({'state_dict': state_dict, 'best_acc': np.float64(0.95)}, path)
    with pytest.raises(ValueError, match='--trust_checkpoint'):
        import_torch.load_torch_checkpoint(str(path))
    loaded = import_torch.load_torch_checkpoint(str(path), trust=True)
    assert sorted(loaded) == sorted(state_dict)


def test_missing_torch_gives_install_hint(monkeypatch, tmp_path):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == 'torch' or name.startswith('torch.'):
            raise ImportError('No module named torch')
        return real_import(name, *args, **kwargs)

    (tmp_path / 'last.pth.tar').write_bytes(b'')
    monkeypatch.setattr(builtins, '__import__', no_torch)
    with pytest.raises(ImportError, match=r'pip install torch==2\.13\.0'):
        import_torch.load_torch_checkpoint(str(tmp_path / 'last.pth.tar'))


# ----------------------------------------------------------------------------------------------
# One zero-shot iteration, JAX vs the authors' PyTorch loop
#
# Adam's first update is lr * g / (|g| + eps), i.e. lr * sign(g) for every |g| >> 1e-8. Elements
# whose gradient is at float32 round-off (the biases of layers followed by a training-mode
# BatchNorm have an exact gradient of 0) therefore move by +-lr at random in either framework: a
# few hundred of the generator's 1M parameters. Those few flips change the generated images by
# about 1%, which the student's attention gradient amplifies into thousands of flipped student
# updates. So the generator update and the student updates are compared each from identical
# inputs: after the generator update, PyTorch's generator takes JAX's updated parameters.

def flax_bn(m):
    return ({'scale': m.weight.detach().numpy(), 'bias': m.bias.detach().numpy()},
            {'mean': m.running_mean.numpy(), 'var': m.running_var.numpy()})


def generator_to_flax(g):
    conv = lambda m: {'kernel': m.weight.detach().numpy().transpose(2, 3, 1, 0),
                      'bias': m.bias.detach().numpy()}
    params = {'fc': {'kernel': g.l1.weight.detach().numpy().T, 'bias': g.l1.bias.detach().numpy()},
              'conv1': conv(g.conv1), 'conv2': conv(g.conv2), 'conv3': conv(g.conv3)}
    stats = {}
    for name in ('bn0', 'bn1', 'bn2', 'bn3'):
        params[name], stats[name] = flax_bn(getattr(g, name))
    # Copies: Tensor.numpy() shares memory with tensors that PyTorch updates in place.
    return jax.tree.map(np.array, {'params': params, 'batch_stats': stats})


def load_generator_params(g, params):
    """Flax generator params -> the PyTorch generator, in place."""
    t = lambda a: torch.from_numpy(np.array(a))
    with torch.no_grad():
        g.l1.weight.copy_(t(params['fc']['kernel']).T)
        g.l1.bias.copy_(t(params['fc']['bias']))
        for name in ('conv1', 'conv2', 'conv3'):
            getattr(g, name).weight.copy_(t(params[name]['kernel']).permute(3, 2, 0, 1))
            getattr(g, name).bias.copy_(t(params[name]['bias']))
        for name in ('bn0', 'bn1', 'bn2', 'bn3'):
            getattr(g, name).weight.copy_(t(params[name]['scale']))
            getattr(g, name).bias.copy_(t(params[name]['bias']))


def wrn_to_flax(model):
    return jax.tree.map(np.array, import_torch.convert_state_dict(
        {k: v.detach().numpy() for k, v in model.state_dict().items()},
        f'WRN-{len(model.block1.layer) * 6 + 4}-{model.fc.in_features // 64}',
        model.fc.out_features))


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def torch_kl(student_logits, teacher_logits):
    # The authors' F.kl_div with its (old) default reduction 'mean': a mean over the B * C
    # elements. Written as sum / numel, which is what 'mean' computes, without its warning.
    return F.kl_div(F.log_softmax(student_logits, dim=1), F.softmax(teacher_logits, dim=1),
                    reduction='sum') / student_logits.numel()


def torch_attention(x):
    return F.normalize(x.pow(2).mean(1).view(x.size(0), -1))


def torch_generator_update(generator, student, teacher, z, lr_g):
    """The authors' generator update (n_g = 1): loss_G = -KL, clip to norm 5, Adam."""
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr_g)
    generator.train(), student.train(), teacher.eval()
    x = generator(z)
    t_logits, *_ = teacher(x)
    s_logits, *_ = student(x)  # training mode: the student's running statistics move here too
    loss = -torch_kl(s_logits, t_logits)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(generator.parameters(), 5)
    optimizer.step()
    return loss.item()


def torch_student_updates(generator, student, teacher, z, n_s, beta, lr_s):
    """The authors' n_s student updates: KL + beta * AT, clip to norm 5, Adam; the teacher's
    outputs are computed once. Returns [(loss, kl, at)] per update."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr_s)
    generator.train(), student.train(), teacher.eval()
    seen = []
    for i in range(n_s):
        x = generator(z).detach()
        if i == 0:
            with torch.no_grad():
                t_logits, *t_act = teacher(x)
        s_logits, *s_act = student(x)
        kl = torch_kl(s_logits, t_logits)
        at = sum((torch_attention(s) - torch_attention(t)).pow(2).mean()
                 for s, t in zip(s_act, t_act))
        loss = kl + beta * at
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5)
        optimizer.step()
        seen.append((loss.item(), kl.item(), at.item()))
    return seen


def jax_iteration(generator_vars, student_vars, teacher_vars, z, *, n_s, beta, lr_g, lr_s,
                  teacher_arch):
    """zero_shot.make_iteration_body under shard_map on a 1-device mesh, z given."""
    models = zero_shot.Models(
        generator=Generator(axis_name=parallel.DATA_AXIS),
        student=build_wide_resnet('WRN-16-1', 10, axis_name=parallel.DATA_AXIS),
        teacher=build_wide_resnet(teacher_arch, 10, axis_name=parallel.DATA_AXIS))
    tx = adam(5.0)  # clip to global norm 5, then Adam: the authors' clip_grad_norm_ + Adam
    body = zero_shot.make_iteration_body(
        models, n_generator_steps=1, n_student_steps=n_s, beta=beta, num_iterations=100,
        generator_lr=lr_g, student_lr=lr_s,
        unroll=jax.default_backend() == 'cpu')  # as config.update_loop = 'auto' does
    mesh = parallel.make_mesh(jax.devices()[:1])
    sharded = parallel.data_parallel(body, mesh, (P(), P(), P(), P(parallel.DATA_AXIS)),
                                     (P(), P(), P()))

    @jax.jit
    def run(generator_vars, student_vars, teacher_vars, z):
        generator, student = (
            TrainState(step=jnp.zeros((), jnp.int32), params=v['params'],
                       batch_stats=v['batch_stats'], opt_state=tx.init(v['params']), tx=tx)
            for v in (generator_vars, student_vars))
        return sharded(generator, student, teacher_vars, z)

    return models, run(generator_vars, student_vars, teacher_vars, z)


def test_one_iteration_matches_pytorch():
    beta, lr_g, lr_s, batch, z_dim, n_s = 250.0, 1e-3, 2e-3, 8, 100, 2  # the paper's rates
    teacher_arch = 'WRN-16-2'
    torch.manual_seed(0)
    generator = TorchGenerator(z_dim)  # PyTorch's default init, as the authors'
    with torch.no_grad():  # random BN affine parameters (not 1 and 0), so that they matter
        for name in ('bn0', 'bn1', 'bn2', 'bn3'):
            bn = getattr(generator, name)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    student = randomize(TorchWideResNet(16, 10, 1), seed=5)
    teacher = torch_wrn(teacher_arch, seed=6)
    z = torch.randn(batch, z_dim, generator=torch.Generator().manual_seed(7))

    generator_vars, student_vars = generator_to_flax(generator), wrn_to_flax(student)
    teacher_vars = wrn_to_flax(teacher)
    models, (new_generator, new_student, metrics) = jax_iteration(
        generator_vars, student_vars, teacher_vars, z.numpy(), n_s=n_s, beta=beta, lr_g=lr_g,
        lr_s=lr_s, teacher_arch=teacher_arch)
    metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
    close = lambda got, want, what: np.testing.assert_allclose(got, want, rtol=1e-4, atol=0,
                                                               err_msg=what)

    # Generator update: the same loss; the same parameter updates but for round-off flips.
    close(metrics['generator_loss'], torch_generator_update(generator, student, teacher, z, lr_g),
          'generator loss')
    before, after, want = (leaves(generator_vars['params']), leaves(new_generator.params),
                           leaves(generator_to_flax(generator)['params']))
    differ = sum(int(np.sum(np.abs(after[k] - want[k]) > 0.1 * lr_g)) for k in want)
    moved = sum(int(np.sum(np.abs(want[k] - before[k]) > 0.5 * lr_g)) for k in want)
    total = sum(v.size for v in want.values())
    assert differ <= 0.005 * total, f'{differ} of {total} generator updates differ'
    assert moved >= 0.9 * total  # Adam's first step moves (nearly) every parameter by ~lr

    # Student updates, from the same generator: losses, parameters and running statistics (which
    # moved at all three training-mode forward passes: the generator update's and two updates').
    load_generator_params(generator, jax.device_get(new_generator.params))
    seen = torch_student_updates(generator, student, teacher, z, n_s, beta, lr_s)
    close(metrics['kl_before_student_updates'], seen[0][1], 'first student update: KL')
    close(metrics['student_loss'], seen[1][0], 'second student update: loss')
    close(metrics['kl'], seen[1][1], 'second student update: KL')
    close(metrics['attention'], seen[1][2], 'second student update: attention')

    # The first update's total loss (the body reports only its KL), recomputed in JAX from the
    # same states with the body's networks (their BatchNorms average over the mesh axis).
    def first_student_loss(generator_vars, student_vars, teacher_vars, z):
        images, _ = models.generator.apply(generator_vars, z, train=True, mutable=['batch_stats'])
        t_logits, t_act = models.teacher.apply(teacher_vars, images)
        (s_logits, s_act), _ = models.student.apply(student_vars, images, train=True,
                                                    mutable=['batch_stats'])
        return jax.lax.pmean(losses.student_loss(t_logits, s_logits, t_act, s_act, beta)[0],
                             parallel.DATA_AXIS)

    first_loss = jax.jit(parallel.data_parallel(
        first_student_loss, parallel.make_mesh(jax.devices()[:1]),
        (P(), P(), P(), P(parallel.DATA_AXIS)), P()))(
        {'params': new_generator.params, 'batch_stats': new_generator.batch_stats},
        student_vars, teacher_vars, z.numpy())
    close(float(first_loss), seen[0][0], 'first student update: loss')

    # Running statistics: all within 1e-4. Parameters: Adam's near-sign first step flips the
    # elements whose gradient is at round-off level, and the second update's gradients inherit
    # those flips, so a small fraction (0.5% measured) differ by up to 4 * lr. A wrong gradient
    # (BatchNorm mode, loss weighting, clipping) changes the direction of most of them.
    got, want = leaves(new_student.batch_stats), leaves(wrn_to_flax(student)['batch_stats'])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-4, err_msg=f'batch_stats{k}')
    got, want = leaves(new_student.params), leaves(wrn_to_flax(student)['params'])
    total = sum(v.size for v in want.values())
    differ = sum(int(np.sum(np.abs(got[k] - want[k]) > 1e-4)) for k in want)
    assert differ <= 0.02 * total, f'{differ} of {total} student parameters differ by > 1e-4'
    worst = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    assert worst <= 4 * lr_s * 1.01, worst
