"""The project installed: a real (non-editable) ``pip install`` into a fresh virtual environment
runs a tiny digits distillation with the ``zskt-jax`` command from a directory outside the
checkout, on the installed copy of ``zskt_jax`` and ``configs``; its dependencies are
requirements.txt's pins. Config files and teacher recipes are found without the current
directory (``launch.find_config_file``, ``launch.find_recipe``)."""
import json
import os
import shutil
import site
import subprocess
import sys

import pytest

from conftest import ROOT

from zskt_jax import errors, launch

# --- Where config files and recipes are found (in this process, no JAX) ---

RECIPE = '''from configs import teacher_digits


def get_config():
    config = teacher_digits.get_config()
    config.epochs = {epochs}
    return config
'''


def digits_config_naming(recipe: str) -> str:
    return f'''from configs import digits


def get_config():
    config = digits.get_config()
    config.teacher.recipe = {recipe!r}
    return config
'''


def test_recipe_is_read_next_to_the_config_file_not_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / 'mine').mkdir()
    config_path = tmp_path / 'mine' / 'distil.py'
    config_path.write_text(digits_config_naming('my_teacher.py'))
    (tmp_path / 'mine' / 'my_teacher.py').write_text(RECIPE.format(epochs=7))
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'elsewhere' / 'my_teacher.py').write_text(RECIPE.format(epochs=99))
    monkeypatch.chdir(tmp_path / 'elsewhere')  # a recipe of the same name here is not read
    config = launch.load_config_file(str(config_path))
    assert launch.find_recipe('my_teacher.py', str(config_path)) == str(
        tmp_path / 'mine' / 'my_teacher.py')
    assert launch.teacher_recipe_config(config, str(config_path)).epochs == 7


@pytest.mark.parametrize('recipe', ['configs/teacher_digits.py', 'teacher_digits.py'])
def test_recipe_of_the_configs_package_is_found_from_anywhere(recipe, tmp_path, monkeypatch):
    """The configs' own form ('configs/teacher_digits.py') and the bare file name, named by a
    config file elsewhere or by none (a config built in Python)."""
    monkeypatch.chdir(tmp_path)
    config_path = tmp_path / 'distil.py'
    config_path.write_text(digits_config_naming(recipe))
    expected = os.path.join(launch.configs_dir(), 'teacher_digits.py')
    for path in (str(config_path), None):
        assert launch.find_recipe(recipe, path) == expected
    config = launch.load_config_file(str(config_path))
    assert launch.teacher_recipe_config(config, str(config_path)).epochs == 30


def test_missing_recipe_names_the_places_looked_at(tmp_path):
    config_path = tmp_path / 'distil.py'
    with pytest.raises(errors.ConfigError, match='no_such_teacher.py.*not found; looked at') as e:
        launch.find_recipe('no_such_teacher.py', str(config_path))
    assert str(tmp_path / 'no_such_teacher.py') in str(e.value)


def test_config_path_falls_back_to_the_configs_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    digits = os.path.join(launch.configs_dir(), 'digits.py')
    assert launch.find_config_file('configs/digits.py') == digits
    assert launch.find_config_file('digits.py') == digits
    assert launch.resolve_config_argv(['--config=configs/digits.py', '--config.n_s=2']) == [
        f'--config={digits}', '--config.n_s=2']
    assert launch.resolve_config_argv(['--config', 'digits.py']) == ['--config', digits]
    (tmp_path / 'digits.py').write_text(digits_config_naming(''))
    assert launch.find_config_file('digits.py') == 'digits.py'  # a file given that exists wins
    assert launch.find_config_file('nowhere.py') == 'nowhere.py'  # the loader says it is missing


# --- A real install into a fresh virtual environment ---

# The tiny run: configs/digits.py (the installed copy) at tiny sizes, its teacher trained first
# for one epoch by a recipe next to this file. It also records what it imported.
TINY_DIGITS = '''import json
import os

import configs
import zskt_jax
from configs import digits


def get_config():
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imported.json'), 'w') as f:
        json.dump({{'zskt_jax': zskt_jax.__file__, 'configs': configs.__file__}}, f)
    config = digits.get_config()
    config.data_dir = {data_dir!r}
    config.teacher.recipe = 'tiny_teacher.py'  # next to this file, not in the current directory
    config.teacher.arch, config.teacher.base_width = 'WRN-10-1', 4
    config.student.arch, config.student.base_width = 'WRN-10-1', 4
    config.generator.hidden = 8
    config.batch_size = 16
    config.num_iterations = 2
    config.n_s = 1
    config.replay_size, config.replay_batch = 32, 16
    config.weight_grad_chunk = 0
    config.eval_every_iterations = 2
    config.log_every_iterations = 1
    config.checkpoint_every_iterations = 2
    return config
'''

# What the build reads: pyproject.toml, README.md, requirements.txt, the packages.
NOT_BUILT = shutil.ignore_patterns('.git', 'runs', 'build', 'dist', '*.egg-info', '__pycache__',
                                   '.whl', '.pytest_cache', 'tests', 'docs', 'benchmarks')


def requirement_pins():
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        lines = [line.split('#', 1)[0].strip() for line in f]
    return [line for line in lines if line]


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """(venv python, environment) with this checkout installed by pip, not editable. The venv
    sees the test environment's packages (--system-site-packages, and a .pth naming them when
    the tests themselves run in a virtual environment), so nothing is downloaded; it has no pip
    or setuptools of its own (--without-pip: Python 3.11's bundled setuptools is too old for
    pyproject.toml), so the test environment's pip and setuptools build and install."""
    base = tmp_path_factory.mktemp('install')
    source = base / 'source'  # a copy, so that the build writes nothing into the checkout
    shutil.copytree(ROOT, source, ignore=NOT_BUILT)
    venv = base / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', '--system-site-packages',
                    str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / 'bin' / 'python')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
    if sys.prefix != sys.base_prefix:  # the test environment is itself a venv
        venv_site = subprocess.run([python, '-c', 'import site; print(site.getsitepackages()[0])'],
                                   check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(venv_site, 'test_environment.pth'), 'w') as f:
            f.write('\n'.join(site.getsitepackages()) + '\n')
    result = subprocess.run([python, '-m', 'pip', 'install', '--quiet', '--no-deps',
                             '--no-build-isolation', '--no-index',
                             '--disable-pip-version-check', str(source)],
                            cwd=str(base), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return python, env


def in_venv(python, *paths):
    """Each path lies in the venv (its site-packages), none in the checkout."""
    venv = os.path.dirname(os.path.dirname(python))
    for path in paths:
        assert os.path.realpath(path).startswith(os.path.realpath(venv) + os.sep), path
        assert not os.path.realpath(path).startswith(os.path.realpath(ROOT) + os.sep), path


def test_installed_package_has_its_subpackages_configs_and_the_pinned_dependencies(
        installed, tmp_path):
    python, env = installed
    probe = ('import importlib.metadata as m, json, configs, configs.teacher_digits, zskt_jax, '
             'zskt_jax.models, zskt_jax.datasets\n'
             'print(json.dumps({"files": [configs.__file__, configs.teacher_digits.__file__, '
             'zskt_jax.__file__, zskt_jax.models.__file__, zskt_jax.datasets.__file__], '
             '"requires": m.requires("zskt_jax"), "version": m.version("zskt_jax")}))')
    result = subprocess.run([python, '-c', probe], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    in_venv(python, *report['files'])
    assert report['version'] == '0.1.0'
    assert report['requires'] == requirement_pins()  # pyproject.toml reads requirements.txt


def test_installed_command_runs_the_digits_config_outside_the_checkout(installed, tmp_path):
    """``zskt-jax`` from a working directory that is neither the checkout nor the config's:
    the config file imports the installed configs, its recipe is read next to it, the teacher
    is trained (one epoch), then two distillation iterations write results.json."""
    python, env = installed
    config_dir, cwd = tmp_path / 'my_configs', tmp_path / 'work'
    config_dir.mkdir()
    cwd.mkdir()
    (config_dir / 'tiny_digits.py').write_text(
        TINY_DIGITS.format(data_dir=str(tmp_path / 'tfds')))
    (config_dir / 'tiny_teacher.py').write_text(RECIPE.format(epochs=1))
    command = os.path.join(os.path.dirname(python), 'zskt-jax')
    result = subprocess.run([command, '--config=../my_configs/tiny_digits.py',
                             '--workdir=run'], cwd=str(cwd), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    # The installed package carries the C++ source of its oneDNN convolutions (the digits
    # configs' speed mode) and builds it, or says why not.
    assert "using XLA's convolutions" not in result.stdout + result.stderr, result.stderr[-3000:]
    results = json.loads((cwd / 'run' / 'results.json').read_text())
    assert results['iterations'] == 2 and 0 <= results['student_accuracy'] <= 1
    teacher = json.loads((cwd / 'runs' / 'teacher_digits16_WRN-10-1' / 'teacher' /
                          'teacher.json').read_text())
    assert (teacher['arch'], teacher['base_width'], teacher['epochs']) == ('WRN-10-1', 4, 1)
    imported = json.loads((config_dir / 'imported.json').read_text())
    in_venv(python, imported['zskt_jax'], imported['configs'])

    # python -m zskt_jax finds configs/digits.py in the installed package (an unknown field
    # stops it before JAX starts, naming the file it read).
    result = subprocess.run([python, '-m', 'zskt_jax', '--config=configs/digits.py',
                             '--config.no_such_field=1'], cwd=str(cwd), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Unknown config field 'no_such_field'" in result.stderr
    [path] = [word for word in result.stderr.split() if word.endswith('digits.py')]
    in_venv(python, path)


@pytest.mark.parametrize('script', ['scripts/seeds.py', 'benchmarks/iteration.py',
                                    'benchmarks/layers.py', 'benchmarks/gpu_check.py',
                                    'benchmarks/prepare_device.py'])
def test_scripts_run_from_a_checkout_that_is_not_installed(script, tmp_path):
    """After `pip install -r requirements.txt` alone (the README's first command) the project is
    not installed: each script finds the checkout's zskt_jax itself. ``python -S`` with the
    site-packages on PYTHONPATH imports the dependencies but not the editable install of this
    project (its .pth finder runs only when ``site`` does)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        site.getsitepackages() + [site.getusersitepackages()]))
    result = subprocess.run([sys.executable, '-S', os.path.join(ROOT, script), '--help'],
                            cwd=str(tmp_path), env=env, capture_output=True, text=True,
                            timeout=120)
    output = result.stdout + result.stderr
    # --help exits 0 (argparse) or 1 (absl) after printing the script's own flags.
    assert result.returncode in (0, 1) and 'Traceback' not in output, output
    assert '--help' in output or '-h, --help' in output, output
