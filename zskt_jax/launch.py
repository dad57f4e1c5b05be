"""Launching a job: multi-process start-up, the config file and its overrides, the teacher
recipe, logging, then the job's ``train_and_evaluate(config, workdir)``. ``zskt_jax/cli.py`` (the
``zskt-jax`` command, ``python -m zskt_jax`` and ``run.py``) holds only the flags and calls
``main``; ``scripts/seeds.py`` and the tests use the pieces.

Config files are found without the current directory mattering where it can: a ``--config``
path that does not exist as given is looked up in the ``configs`` package (``configs/digits.py``
or ``digits.py`` from any directory once the project is installed), and a relative teacher recipe
is read next to the config file that named it, else from the ``configs`` package
(``find_config_file``, ``find_recipe``).
"""
import glob
import logging
import os
import sys

from absl import app
from etils import epath

from zskt_jax import errors, methods, paths, validation

# config.job -> the module whose train_and_evaluate(config, workdir) runs it.
JOBS = {
    'zero_shot': 'zskt_jax.zero_shot',
    'teacher': 'zskt_jax.teacher',
    'few_shot': 'zskt_jax.few_shot',
    'belief': 'zskt_jax.belief',
}


def default_workdir(config, config_path: str) -> str:
    """runs/<config file name>; a teacher goes where the distillation looks for it by default."""
    if config.job == 'teacher':
        from zskt_jax import common
        return common.default_teacher_workdir(config.dataset,
                                              common.network_arch(config.teacher))
    return os.path.join('runs', os.path.splitext(os.path.basename(config_path))[0])


def run_job(config, workdir: str):
    import importlib
    if config.job not in JOBS:
        raise errors.ConfigError(f'config.job = {config.job!r}; choose one of {sorted(JOBS)}')
    return importlib.import_module(JOBS[config.job]).train_and_evaluate(config, workdir)


def load_config_file(path: str):
    """``get_config()`` of a config file given by path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f'config_{abs(hash(path))}', path)
    if spec is None or not os.path.exists(path):
        raise errors.ConfigError(f'config file {path!r} does not exist')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def configs_dir():
    """The directory of the ``configs`` package (the checkout's, or the installed copy's), or
    None where there is none."""
    try:
        import configs
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(configs.__file__))


def _in_configs_package(path: str):
    """Where a relative ``path`` would be in the configs package: 'configs/x.py' (the form the
    configs themselves use, relative to the directory holding the package) and 'x.py'."""
    if os.path.isabs(path) or configs_dir() is None:
        return []
    places = []
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) > 1 and parts[0] == 'configs':
        places.append(os.path.join(configs_dir(), *parts[1:]))
    places.append(os.path.join(configs_dir(), path))
    return places


def find_config_file(path: str) -> str:
    """``path`` itself where it exists (a command-line path: relative to the current directory),
    else the same relative path in the configs package; ``path`` unchanged when neither exists
    (the loader then says it does not)."""
    if os.path.exists(path):
        return path
    return next((p for p in _in_configs_package(path) if os.path.isfile(p)), path)


def find_recipe(recipe: str, config_path=None) -> str:
    """The file of a teacher recipe: an absolute path as is; a relative one next to the config
    file that named it (``config_path``), else in the configs package ('configs/teacher_digits.py'
    as the configs name theirs, or 'teacher_digits.py'). Never the current directory."""
    if os.path.isabs(recipe):
        places = [recipe]
    else:
        places = [os.path.join(os.path.dirname(os.path.abspath(config_path)), recipe)
                  ] if config_path else []
        places += _in_configs_package(recipe)
    for place in places:
        if os.path.isfile(place):
            return place
    raise errors.ConfigError(f'teacher recipe {recipe!r} (config.teacher.recipe) not found; '
                             f'looked at {", ".join(places)}')


def resolve_config_argv(argv):
    """``argv`` with the path of ``--config=PATH`` (or ``--config PATH``) replaced by the file
    ``find_config_file`` finds, so that ``--config=configs/digits.py`` works from any directory
    with the project installed."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith('--config='):
            argv[i] = '--config=' + find_config_file(arg[len('--config='):])
        elif arg == '--config' and i + 1 < len(argv):
            argv[i + 1] = find_config_file(argv[i + 1])
    return argv


# What a teacher recipe takes from the config that asked for it: the data it must classify and
# the network the distillation will load (a recipe's own values would train another teacher),
# and the precision and convolutions the command runs with.
TEACHER_RECIPE_OVERRIDES = ('dataset', 'data_dir', 'teacher.arch', 'teacher.base_width',
                            'teacher.checkpoint', 'compute_dtype', 'convolution')


def teacher_recipe_config(config, config_path=None):
    """The config of ``config.teacher.recipe`` (found by ``find_recipe``: next to the config
    file ``config_path``, else in the configs package), with the fields of
    TEACHER_RECIPE_OVERRIDES taken from ``config``."""
    recipe = config.teacher.recipe
    teacher_config = load_config_file(find_recipe(recipe, config_path))
    with teacher_config.unlocked():
        for dotted in TEACHER_RECIPE_OVERRIDES:
            *sections, field = dotted.split('.')
            source, target = config, teacher_config
            for section in sections:
                source, target = source[section], target[section]
            target[field] = source[field]
    return teacher_config


def train_teacher_if_missing(config, config_path=None):
    """The embedded default trains its own teacher first (``config.teacher.recipe``, read
    relative to ``config_path``, the config file), for this config's dataset and teacher
    network. Returns the teacher job's results, or None."""
    from zskt_jax import common
    recipe = config.teacher.get('recipe', '')
    if not recipe or epath.Path(common.teacher_dir(config), 'teacher.json').exists():
        return None
    teacher_config = teacher_recipe_config(config, config_path)
    workdir = os.path.dirname(paths.absolute(common.teacher_dir(config)))
    validation.check(teacher_config, workdir)
    logging.getLogger('zskt_jax').info('No teacher at %s: training one with %s first.',
                                       common.teacher_dir(config), recipe)
    return run_job(teacher_config, workdir)


def running_on_tpu_vm() -> bool:
    """TPU chips attached to this machine (read from /sys and /dev; starts no backend)."""
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a private helper; fall back to the device files
        return bool(glob.glob('/dev/accel[0-9]*') or glob.glob('/dev/vfio/[0-9]*'))


def distributed_settings(coordinator_address=None, num_processes=None, process_id=None,
                         mode=None, environ=None, on_tpu_vm=None):
    """The keyword arguments of ``jax.distributed.initialize``, or None for a single process.

    Flags win over the environment (ZSKT_COORDINATOR_ADDRESS, ZSKT_NUM_PROCESSES,
    ZSKT_PROCESS_ID, ZSKT_DISTRIBUTED); settings left out are detected by JAX on the clusters it
    knows (TPU VMs, SLURM, Open MPI, Kubernetes).
    """
    environ = os.environ if environ is None else environ
    mode = mode or environ.get('ZSKT_DISTRIBUTED', 'auto')
    if mode not in ('auto', 'on', 'off'):
        raise errors.ConfigError(f"ZSKT_DISTRIBUTED = {mode!r}; choose 'auto', 'on' or 'off'")
    if mode == 'off':
        return None

    def setting(value, name, kind):
        if value is None and environ.get(name, '') != '':
            try:
                value = kind(environ[name])
            except ValueError:
                raise errors.ConfigError(
                    f'{name} = {environ[name]!r} is not a valid {kind.__name__}') from None
        return value

    settings = {'coordinator_address': setting(coordinator_address, 'ZSKT_COORDINATOR_ADDRESS', str),
                'num_processes': setting(num_processes, 'ZSKT_NUM_PROCESSES', int),
                'process_id': setting(process_id, 'ZSKT_PROCESS_ID', int)}
    settings = {k: v for k, v in settings.items() if v is not None}
    if settings or mode == 'on':
        return settings
    if on_tpu_vm if on_tpu_vm is not None else running_on_tpu_vm():
        return {}  # a TPU VM, one host or a pod slice: JAX reads the topology from the VM
    return None


def start_distributed(settings) -> None:
    """``jax.distributed.initialize`` (before anything starts a JAX backend), or nothing."""
    if settings is None:
        return
    import jax
    try:
        jax.distributed.initialize(**settings)
    except ValueError as error:
        raise app.UsageError(
            f'Could not start the multi-process run with {settings or "no settings"} ({error}). '
            'Outside a TPU VM or a cluster that JAX detects, pass all of --coordinator_address='
            'HOST:PORT (process 0\'s address), --num_processes=N and --process_id=I on every '
            'process, or --distributed=off for a single-process run.') from error


def setup_logging():
    """Our progress lines on stdout; the libraries' INFO chatter (Orbax, TFDS) off.

    With several processes only process 0 reports progress; the others log warnings and errors.
    """
    import jax
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logger = logging.getLogger('zskt_jax')
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if jax.process_index() == 0 else logging.WARNING)
    logger.propagate = False


def main(config, config_path: str, workdir=None, *, coordinator_address=None, num_processes=None,
         process_id=None, distributed=None, verbose=False, overridden=()):
    """run.py's whole job: start-up, the teacher recipe where one is named, the job, its summary
    line. A person's error is printed and exits with status 2 (``errors.exit_for_people``)."""
    try:
        _main(config, config_path, workdir, coordinator_address, num_processes, process_id,
              distributed, overridden)
    except errors.UserError as error:
        errors.exit_for_people(error, verbose)


def _main(config, config_path, workdir, coordinator_address, num_processes, process_id,
          distributed, overridden=()):
    start_distributed(distributed_settings(coordinator_address, num_processes, process_id,
                                           distributed))
    setup_logging()
    workdir = workdir or default_workdir(config, config_path)
    methods.resolve(config, overridden)  # --config.method's preset; command-line fields win
    validation.check(config, workdir)  # every field and the workdir, before any work
    results = None
    if config.job in ('zero_shot', 'few_shot'):
        results = train_teacher_if_missing(config, config_path)
    if not (results and 'stopped_at' in results):  # a teacher stopped mid-way: rerun to go on
        results = run_job(config, workdir)
    import jax
    if results and jax.process_index() == 0:
        summary = [f'{k}={100 * v:.2f}%' for k, v in results.items() if k.endswith('accuracy')]
        summary += [f'mte={results["mte"]:.4f}'] if 'mte' in results else []
        if summary:  # a stopped run has none; its log says where it stopped
            print(' '.join(summary))


def overridden_field(arg: str):
    """The dotted config field a command-line argument sets ('student.arch' for
    ``--config.student.arch=resnet18`` or ``--config.student.arch``), else None."""
    return arg[len('--config.'):].split('=', 1)[0] if arg.startswith('--config.') else None


def overridden_fields(argv) -> set:
    """Every config field a command line sets: {'bn_weight', 'student.arch'}."""
    return {field for field in map(overridden_field, argv) if field}


def check_overrides(argv) -> None:
    """Fail early, naming the field, when a --config.FIELD override names no field of the config
    (ml_collections would otherwise fail with a bare AttributeError deep in flag parsing)."""
    argv = resolve_config_argv(argv)
    config_path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
    if config_path is None:
        return
    config = load_config_file(config_path)
    for arg in argv:
        dotted = overridden_field(arg)
        if dotted is None:
            continue
        node = config
        for depth, part in enumerate(dotted.split('.')):
            if not hasattr(node, 'keys') or part not in node.keys():
                parent = '.'.join(dotted.split('.')[:depth]) or '<top level>'
                known = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else '(not a section)'
                raise errors.ConfigError(
                    f'Unknown config field {dotted!r} in {arg!r}: {config_path} has no '
                    f'{part!r} under {parent}. Fields there: {known}')
            node = node[part]


def check_overrides_or_exit(argv) -> None:
    """check_overrides for a launcher: a person's error is printed, status 2, no traceback."""
    try:
        check_overrides(argv)
    except errors.UserError as error:
        errors.exit_for_people(error, '--verbose' in argv)
