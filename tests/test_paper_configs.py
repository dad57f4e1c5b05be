"""The paper's configurations (docs/method.md): zero-shot SVHN / CIFAR-10 / CIFAR-100, the teacher
recipes, the six teacher -> student pairs as command-line overrides, and scripts/seeds.py."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from zskt_jax import launch
from configs import default, teacher_default
from zskt_jax import common, data, import_torch, teacher
from zskt_jax.models import build_wide_resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# docs/method.md, section "WideResNet": parameter counts, and the pairs studied
# (teacher -> student).
PARAMETERS = {'WRN-16-1': 175_066, 'WRN-16-2': 691_674, 'WRN-40-1': 563_930,
              'WRN-40-2': 2_243_546}
PAIRS = [('WRN-16-2', 'WRN-16-1'), ('WRN-40-1', 'WRN-16-1'), ('WRN-40-2', 'WRN-16-1'),
         ('WRN-40-1', 'WRN-16-2'), ('WRN-40-2', 'WRN-16-2'), ('WRN-40-2', 'WRN-40-1')]
ZERO_SHOT = {'svhn': ('svhn', 50_000), 'cifar10': ('cifar10', 80_000),
             'cifar100': ('cifar100', 80_000)}
TEACHERS = {'svhn': (100, 'none', (30, 60, 80)), 'cifar10': (200, 'crop_flip', (60, 120, 160)),
            'cifar100': (200, 'crop_flip', (60, 120, 160))}


def parse(config_file, *overrides):
    """The config exactly as run.py's command line builds it (config_flags, overrides, lock)."""
    argv = ['run.py', f'--config={os.path.join(ROOT, "configs", config_file)}', *overrides]
    flag_values = flags.FlagValues()
    # sys_argv: config_flags finds the override flags in the command line it is given.
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


@functools.lru_cache(maxsize=None)
def shapes(arch, num_classes):
    """(parameter count, spatial sizes of the three groups) of a WRN at 32x32, no FLOPs spent."""
    model = build_wide_resnet(arch, num_classes)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    _, groups = jax.eval_shape(model.apply, variables, x)
    count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables['params']))
    return count, [g.shape[1:3] for g in groups]


@pytest.mark.parametrize('name', sorted(ZERO_SHOT))
def test_zero_shot_config_is_the_papers(name):
    dataset, iterations = ZERO_SHOT[name]
    config = parse(f'{name}.py')
    assert config.job == 'zero_shot' and config.dataset == dataset
    assert config.num_iterations == iterations and config.eval_every_iterations == iterations // 100
    assert (config.teacher.arch, config.student.arch) == ('WRN-40-2', 'WRN-16-1')
    # Everything else is default.py's, i.e. the paper's hyperparameters.
    changed = {k for k, v in flatten(config.to_dict()).items()
               if flatten(default.get_config().to_dict())[k] != v}
    assert changed <= {'dataset', 'num_iterations', 'eval_every_iterations'}, changed
    assert (config.batch_size, config.n_g, config.n_s, config.beta, config.grad_clip) == \
        (128, 1, 10, 250.0, 5.0)
    assert (config.student_lr, config.generator_lr) == (2e-3, 1e-3)
    assert (config.adam_b1, config.adam_b2, config.adam_eps) == (0.9, 0.999, 1e-8)
    assert (config.generator.z_dim, config.generator.hidden) == (100, 128)
    assert config.teacher.base_width == config.student.base_width == 16
    assert config.compute_dtype == 'float32' and config.teacher.recipe == ''


def flatten(tree, prefix=''):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def test_eval_every_follows_overridden_iterations():
    assert parse('cifar10.py', '--config.num_iterations=1000').eval_every_iterations == 10
    assert parse('svhn.py', '--config.num_iterations=1000',
                 '--config.eval_every_iterations=7').eval_every_iterations == 7


@pytest.mark.parametrize('name', ['svhn', 'cifar10'])
@pytest.mark.parametrize('teacher_arch,student_arch', PAIRS)
def test_every_pair_by_override(name, teacher_arch, student_arch):
    config = parse(f'{name}.py', f'--config.teacher.arch={teacher_arch}',
                   f'--config.student.arch={student_arch}')
    assert (config.teacher.arch, config.student.arch) == (teacher_arch, student_arch)
    num_classes = data.dataset_info(config.dataset).num_classes
    counts = {}
    for role in ('teacher', 'student'):
        network = common.build_network(config[role], num_classes, config)
        counts[role], spatial = shapes(config[role].arch, num_classes)
        assert (network.depth, network.width) == tuple(
            int(n) for n in config[role].arch.split('-')[1:])
        counts[role + '_spatial'] = spatial
    assert counts['teacher'] == PARAMETERS[teacher_arch]
    assert counts['student'] == PARAMETERS[student_arch]
    # beta > 0 needs groups of equal spatial sizes (docs/method.md): true for every pair.
    assert counts['teacher_spatial'] == counts['student_spatial'] == [(32, 32), (16, 16), (8, 8)]
    assert common.teacher_dir(config) == os.path.join(
        'runs', f'teacher_{config.dataset}_{teacher_arch}', 'teacher')


def test_cifar100_has_a_hundred_classes():
    config = parse('cifar100.py', '--config.student.arch=WRN-16-2')
    assert data.dataset_info(config.dataset).num_classes == 100
    # 100-way fc: 64k * 100 + 100 parameters instead of 64k * 10 + 10.
    assert shapes('WRN-16-2', 100)[0] == PARAMETERS['WRN-16-2'] + 128 * 90 + 90


@pytest.mark.parametrize('name', sorted(TEACHERS))
def test_teacher_recipe_is_the_papers(name):
    epochs, augment, milestone_epochs = TEACHERS[name]
    config = parse(f'teacher_{name}.py')
    assert config.job == 'teacher' and config.dataset == name
    assert (config.epochs, config.augment) == (epochs, augment)
    assert (config.batch_size, config.learning_rate, config.momentum, config.weight_decay,
            config.nesterov, config.lr_decay) == (128, 0.1, 0.9, 5e-4, False, 0.2)
    assert config.teacher.arch == 'WRN-40-2' and config.teacher.base_width == 16
    changed = {k for k, v in flatten(config.to_dict()).items()
               if flatten(teacher_default.get_config().to_dict())[k] != v}
    assert changed <= {'dataset', 'epochs', 'augment'}, changed
    # lr 0.1 divided by 5 at 30%, 60% and 80% of the run: the epochs where it changes.
    lr = [float(teacher.step_learning_rate(config.learning_rate, jnp.asarray(e), config.epochs,
                                           config.lr_milestones, config.lr_decay))
          for e in range(epochs)]
    assert tuple(e for e in range(1, epochs) if lr[e] != lr[e - 1]) == milestone_epochs
    np.testing.assert_allclose([lr[0], lr[-1]], [0.1, 0.1 / 5 ** 3], rtol=1e-6)


@pytest.mark.parametrize('name,arch', [('svhn', 'WRN-40-2'), ('cifar10', 'WRN-16-2'),
                                       ('cifar100', 'WRN-40-1')])
def test_teacher_goes_where_the_distillation_looks(name, arch):
    """Trained (run.py's default workdir for a teacher config) or imported (import_torch's
    default --out), the teacher lands where the zero-shot config reads it by default."""
    teacher_config = parse(f'teacher_{name}.py', f'--config.teacher.arch={arch}')
    trained = os.path.join(launch.default_workdir(teacher_config, f'configs/teacher_{name}.py'),
                           'teacher')
    zero_shot_config = parse(f'{name}.py', f'--config.teacher.arch={arch}')
    assert trained == common.teacher_dir(zero_shot_config) == \
        import_torch.default_out(name, arch)


# ----------------------------------------------------------------------------------------------
# scripts/seeds.py

@pytest.fixture(scope='module')
def seeds_module():
    import importlib.util
    path = os.path.join(ROOT, 'scripts', 'seeds.py')
    spec = importlib.util.spec_from_file_location('seeds', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_runs_missing_seeds_and_summarises(seeds_module, tmp_path):
    config = parse('cifar10.py', '--config.student.arch=WRN-16-2')
    workdir = str(tmp_path)
    # Seed 1 already finished: it is read, not run again.
    os.makedirs(tmp_path / 'seed_1')
    (tmp_path / 'seed_1' / 'results.json').write_text(
        json.dumps({'student_accuracy': 0.95, 'config': {'seed': 1}}))
    calls = []

    def fake_run(seeded_config, seed_dir):
        calls.append((seeded_config.seed, seeded_config.student.arch, seed_dir))
        accuracy = {0: 0.94, 2: 0.96}[seeded_config.seed]
        with open(os.path.join(seed_dir, 'results.json'), 'w') as f:
            json.dump({'student_accuracy': accuracy, 'config': seeded_config.to_dict()}, f)

    def make_dir_and_run(seeded_config, seed_dir):
        os.makedirs(seed_dir, exist_ok=True)
        fake_run(seeded_config, seed_dir)

    values = seeds_module.run_seeds(config, workdir, [0, 1, 2], make_dir_and_run, log=lambda _: 0)
    assert calls == [(0, 'WRN-16-2', str(tmp_path / 'seed_0')),
                     (2, 'WRN-16-2', str(tmp_path / 'seed_2'))]
    assert config.seed == 0  # the caller's config is not modified
    assert values == {0: 0.94, 1: 0.95, 2: 0.96}
    # Population std (ddof=0) of 94, 95, 96 is 0.816...; the sample std would be 1.00.
    assert seeds_module.format_mean_std(list(values.values())) == '95.00 +- 0.82'
    lines = seeds_module.summary_lines(values, 'student_accuracy', workdir)
    assert lines[-1] == ('student_accuracy over seeds 0, 1, 2: 95.00 +- 0.82  '
                         '(%, mean +- population std, ddof=0)')
    with open(seeds_module.write_summary(workdir, values, 'student_accuracy')) as f:
        summary = json.load(f)
    assert summary['formatted'] == '95.00 +- 0.82' and summary['std_ddof'] == 0
    # Nothing left to run the second time.
    seeds_module.run_seeds(config, workdir, [0, 1, 2], make_dir_and_run, log=lambda _: 0)
    assert len(calls) == 2


def test_seeds_refuses_results_of_another_run(seeds_module, tmp_path):
    os.makedirs(tmp_path / 'seed_0')
    (tmp_path / 'seed_0' / 'results.json').write_text(
        json.dumps({'student_accuracy': 0.9, 'config': {'seed': 5}}))
    with pytest.raises(ValueError, match='seed 5, not 0'):
        seeds_module.run_seeds(parse('svhn.py'), str(tmp_path), [0], None, log=lambda _: 0)
    # ... or of another pair.
    config = parse('svhn.py').to_dict()
    (tmp_path / 'seed_0' / 'results.json').write_text(
        json.dumps({'student_accuracy': 0.9, 'config': config}))
    with pytest.raises(ValueError, match="student.arch: 'WRN-16-1' there, 'WRN-16-2' now"):
        seeds_module.run_seeds(parse('svhn.py', '--config.student.arch=WRN-16-2'), str(tmp_path),
                               [0], None, log=lambda _: 0)


@pytest.mark.parametrize('get_config,unit', [
    (default.get_config, 'iterations'), (teacher_default.get_config, 'epochs'),
    (lambda: launch.load_config_file(os.path.join(ROOT, 'configs', 'few_shot_default.py')),
     'iterations')])
def test_runtime_fields_are_the_shared_ones_with_their_unit(get_config, unit):
    """Cadence, checkpoints and precision come from configs/runtime.py in every training job,
    the cadence named with the job's unit; none of them must match on resume, everything else
    (a field added tomorrow included) must."""
    from configs import runtime
    from zskt_jax import checkpoints
    import ml_collections
    config = get_config()
    shared = runtime.add(ml_collections.ConfigDict(), unit=unit, log_every=1, checkpoint_every=1,
                         keep_checkpoints=1, eval_every=None if unit == 'epochs' else 1,
                         stop_unit='steps' if unit == 'epochs' else '')
    assert set(shared) <= set(config), set(shared) - set(config)
    assert not {'log_every', 'eval_every', 'checkpoint_every'} & set(config)
    checked = checkpoints.resume_fields(config.to_dict())
    assert not set(shared) - {'compute_dtype'} & set(checked)
    assert 'compute_dtype' in checked and 'seed' in checked and 'teacher.arch' in checked
    assert 'teacher.checkpoint' not in checked and 'data_dir' not in checked
    saved = json.loads(json.dumps(config.to_dict()))  # as a checkpoint records it
    config.some_new_field = 1
    changed = checkpoints.compare_configs(saved, config.to_dict(),
                                          checkpoints.resume_fields(config.to_dict()))
    assert changed == ["some_new_field: checkpoint '<absent>', now 1"]
