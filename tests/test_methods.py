"""The later methods as presets (zskt_jax/methods.py): what each resolves to is what
docs/methods.md says, a field given on the command line wins, and run.py logs and saves them."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from configs import cifar10, cifar100, default, digits
from tiny_config import write_config_file
from zskt_jax import launch, methods
from zskt_jax.errors import ConfigError


def documented_table():
    """docs/methods.md's preset table: {method: {field: value}} (CIFAR-10, batch 128)."""
    with open(os.path.join(ROOT, 'docs', 'methods.md')) as f:
        lines = [line for line in f if line.startswith('| ')]
    header = [cell.strip() for cell in lines[0].strip('|\n').split('|')]
    table = {}
    for line in lines[1:]:  # the separator row starts with "|-"
        cells = [cell.strip() for cell in line.strip('|\n').split('|')]
        name = cells[0].strip('`')
        table[name] = {field: cells[header.index(field)] for field in methods.FIELDS}
    return table


def as_documented(value) -> str:
    return value if isinstance(value, str) else f'{value:g}'


def test_every_preset_resolves_to_what_its_documentation_says():
    table = documented_table()
    assert sorted(table) == sorted(methods.names())
    for name in methods.names():
        config = cifar10.get_config()
        config.method = name
        resolved = methods.resolve(config)
        assert {f: as_documented(v) for f, v in resolved.items()} == table[name], name
        assert set(methods.PRESETS[name].sources) == set(methods.FIELDS), name


def test_weights_are_the_toolbox_weights_divided_by_the_number_of_classes():
    for config_module, classes in ((cifar10, 10), (cifar100, 100)):
        config = config_module.get_config()
        config.method = 'dfq'
        resolved = methods.resolve(config)
        assert resolved['bn_weight'] == pytest.approx(1 / classes)
        assert resolved['one_hot_weight'] == pytest.approx(1 / classes)
        assert resolved['balance_weight'] == pytest.approx(20 / classes)


def test_robust_preset_is_the_digits_default_at_half_its_bn_weight():
    """configs/digits.py sets its stabilisers by hand: the robust preset's, with twice its
    BatchNorm-statistics weight."""
    config = digits.get_config()
    expected = {field: config[field] for field in methods.FIELDS}
    expected['bn_weight'] /= 2
    config.method = 'robust'
    assert methods.resolve(config) == pytest.approx(expected)


def test_no_method_and_the_paper_configs_leave_the_fields_alone():
    config = default.get_config()
    assert config.method == '' and methods.resolve(config) == {}
    config.method = 'zskt'
    before = config.to_dict()
    methods.resolve(config)
    assert config.to_dict() == before  # the paper's loop: every extra already off


def test_command_line_fields_win_and_unknown_names_are_refused():
    config = cifar10.get_config()
    config.method = 'dfq'
    config.bn_weight = 0.5
    resolved = methods.resolve(config, launch.overridden_fields(
        ['--config=configs/cifar10.py', '--config.method=dfq', '--config.bn_weight=0.5']))
    assert resolved['bn_weight'] == 0.5 and resolved['one_hot_weight'] == pytest.approx(0.1)
    config.method = 'cmi'
    with pytest.raises(ConfigError, match="config.method = 'cmi'; choose one of dafl, dfad"):
        methods.resolve(config)


def test_run_py_logs_and_saves_the_resolved_preset(tmp_path, digits_data_dir, tiny_teacher):
    config_path = write_config_file(tmp_path / 'tiny.py', digits_data_dir, tiny_teacher)
    workdir = tmp_path / 'run'
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'run.py'), f'--config={config_path}',
         f'--workdir={workdir}', '--config.method=dfq', '--config.one_hot_weight=0.3',
         '--config.num_iterations=1', '--config.eval_every_iterations=1'],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"method dfq \(.*\): adversarial_loss='kl', bn_weight=0\.1, "
                     r"balance_weight=2\.0, one_hot_weight=0\.3 \(command line\)",
                     result.stdout + result.stderr)
    saved = json.loads((workdir / 'results.json').read_text())['config']
    assert saved['method'] == 'dfq'
    assert (saved['bn_weight'], saved['balance_weight'], saved['one_hot_weight']) == (
        pytest.approx(0.1), pytest.approx(2.0), 0.3)
