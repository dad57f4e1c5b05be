"""The config of a job, checked field by field before any work (no data read, nothing compiled,
no teacher trained), and the directories the job will write.

``check(config, workdir)`` is called once per config by the launchers (``launch.main``, the
teacher recipe it runs first, ``scripts/seeds.py``). Every field that cannot work is reported in
one ``ConfigError``, each line naming the field, the value seen and what is allowed.

The rules are a table per job (``RULES``): a rule is a field, a test of its value and the words
for what is allowed. What relates two fields or the devices (a batch split over the devices, the
replay memory filled one batch at a time) is a check function per job (``CROSS_CHECKS``). The
modules keep their own checks for the callers that build configs in code.
"""
import math
import numbers
import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

from zskt_jax import methods
from zskt_jax.errors import ConfigError, UserError
from zskt_jax.models.layers import CONVOLUTIONS

JOBS = ('zero_shot', 'teacher', 'few_shot', 'belief')
# config.student_augment of zero-shot runs: 'crop' shifts the student's images (iteration.py).
STUDENT_AUGMENTS = ('none', 'crop')
MISSING = object()


class Rule(NamedTuple):
    field: str                      # dotted name: 'batch_size', 'teacher.arch'
    ok: Callable[[Any], bool]       # the test of its value
    allowed: Any                    # what is allowed, in the words of the message (or a
                                    # function returning them)
    optional: bool = False          # a config may leave it out (the code reads it with a default)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def positive_int(field, note='', **kw):
    return Rule(field, lambda v: _is_int(v) and v > 0, 'a positive integer' + note, **kw)


def non_negative_int(field, note='', **kw):
    return Rule(field, lambda v: _is_int(v) and v >= 0, 'an integer >= 0' + note, **kw)


def positive_int_or_all(field, note):
    return Rule(field, lambda v: _is_int(v) and (v > 0 or v == -1),
                f'a positive integer, or -1 for {note}')


def positive(field, note=''):
    return Rule(field, lambda v: _is_real(v) and v > 0, 'a finite number > 0' + note)


def non_negative(field, note=''):
    return Rule(field, lambda v: _is_real(v) and v >= 0, 'a finite number >= 0' + note)


def fraction(field, upper_open=False):
    return Rule(field, lambda v: _is_real(v) and 0 <= v and (v < 1 if upper_open else v <= 1),
                'a number in [0, 1)' if upper_open else 'a number in [0, 1]')


def fractions(field):
    return Rule(field, lambda v: isinstance(v, (tuple, list))
                and all(_is_real(m) and 0 <= m <= 1 for m in v),
                'a list of fractions of the run, each in [0, 1], e.g. (0.3, 0.6, 0.8)')


def one_of(field, choices, **kw):
    return Rule(field, lambda v: v in choices, 'one of ' + ', '.join(map(repr, choices)), **kw)


def boolean(field):
    return Rule(field, lambda v: isinstance(v, bool), 'True or False')


def text(field, note='', **kw):
    return Rule(field, lambda v: isinstance(v, str), 'a string' + note, **kw)


def architecture(field):
    def ok(value):
        from zskt_jax.models import registry
        try:
            registry.get(value)
        except (ConfigError, TypeError):
            return False
        return True

    def allowed():
        from zskt_jax.models import registry
        return ('an architecture of zskt_jax.models.registry: ' + ', '.join(registry.names())
                + ", or 'WRN-<depth>-<width>' with depth 6n + 4 (10, 16, 22, 28, 40, ...)")
    return Rule(field, lambda v: isinstance(v, str) and ok(v), allowed)


def dataset(field='dataset'):
    def ok(value):
        from zskt_jax import data
        return value in data.DATASETS
    def allowed():  # data imports TFDS: only when a message is written
        from zskt_jax import data
        return 'one of ' + ', '.join(map(repr, sorted(data.DATASETS)))
    return Rule(field, ok, allowed)


def compute_dtype():
    return one_of('compute_dtype', ('float32', 'bfloat16'))


# ----------------------------------------------------------------------------------------------
# The table: the rules of each job.

def _network(section):
    return (architecture(f'{section}.arch'),
            non_negative_int(f'{section}.base_width', " (0: the architecture's own)"),
            text(f'{section}.checkpoint', optional=True), text(f'{section}.recipe', optional=True))


def _runtime(unit, stop_unit=None, evaluates=True):
    """The fields of configs/runtime.py, counted in ``unit``."""
    rules = [positive_int(f'log_every_{unit}'), positive_int(f'checkpoint_every_{unit}'),
             non_negative_int(f'stop_after_{stop_unit or unit}', ' (0: no stop)'),
             positive_int('eval_batch_size'), positive_int('keep_checkpoints'),
             boolean('resume_fallback'), compute_dtype(),
             non_negative_int('weight_grad_chunk', ' (0: off)', optional=True),
             one_of('convolution', CONVOLUTIONS, optional=True)]
    if evaluates:
        rules.append(non_negative_int(f'eval_every_{unit}', ' (0: only at the end)'))
    return tuple(rules)


_COMMON = (non_negative_int('seed'), dataset(), text('data_dir'))

_SGD = (positive('learning_rate'), fraction('momentum', upper_open=True), boolean('nesterov'),
        non_negative('weight_decay'), fractions('lr_milestones'), positive('lr_decay'),
        one_of('augment', ('none', 'crop', 'crop_flip')), positive_int('batch_size'))

RULES = {
    'zero_shot': _COMMON + _network('teacher') + _network('student') + _runtime('iterations') + (
        positive_int('generator.z_dim'), positive_int('generator.hidden'),
        positive_int('num_iterations'), positive_int('batch_size'),
        positive_int('n_g'), positive_int('n_s'),
        positive('generator_lr'), positive('student_lr'),
        fraction('adam_b1', upper_open=True), fraction('adam_b2', upper_open=True),
        positive('adam_eps'), non_negative('grad_clip', ' (0: no clipping)'),
        non_negative('beta', ' (0: no attention transfer)'),
        Rule('method', lambda v: v in ('',) + tuple(methods.names()),
             lambda: 'one of ' + ', '.join(map(repr, ('',) + tuple(methods.names()))),
             optional=True),
        one_of('adversarial_loss', ('kl', 'l1')),
        non_negative('bn_weight', ' (0: off)'), non_negative('balance_weight', ' (0: off)'),
        non_negative('one_hot_weight', ' (0: off)'),
        non_negative_int('replay_size', ' (0: off)'), non_negative_int('replay_batch', ' (0: off)'),
        one_of('student_augment', STUDENT_AUGMENTS),
        positive_int('num_seeds'), one_of('update_loop', ('auto', 'scan', 'unroll'))),
    'teacher': _COMMON + _network('teacher') + _SGD + _runtime(
        'epochs', stop_unit='steps', evaluates=False) + (positive_int('epochs'),),
    'few_shot': _COMMON + _network('teacher') + _network('student') + _SGD + _runtime(
        'iterations') + (
        positive_int_or_all('images_per_class', 'the whole training set'),
        text('init_student_from'), positive_int('full_data_epochs'),
        positive('scale_iterations'), fraction('alpha'), positive('temperature'),
        non_negative('beta', ' (0: no attention transfer)')),
    'belief': (non_negative_int('seed'), text('data_dir'), compute_dtype(),
               Rule('student_workdir', lambda v: isinstance(v, str) and v != '',
                    'the --workdir of a zero-shot or few-shot run '
                    '(--config.student_workdir=runs/digits)'),
               Rule('student_step', lambda v: _is_int(v) and v >= -1,
                    'a checkpoint step >= 0, or -1 for the latest'),
               text('teacher_checkpoint'),
               positive_int_or_all('num_images', 'every agreeing image'),
               positive_int('num_steps'), positive_int('mte_steps'), positive('step_size'),
               positive_int('batch_size'), positive_int('eval_batch_size'),
               non_negative_int('plot_steps'), one_of('attack_loop', ('auto', 'scan', 'steps')),
               non_negative_int('log_every_chunks', ' (0: no progress lines)')),
}


# ----------------------------------------------------------------------------------------------
# What relates fields to each other or to the devices. Each takes (config, device count) and
# returns its problems; it runs only when the fields it reads passed their own rules.

def _batch_splits_over_devices(config, devices):
    if config.batch_size % devices:
        return [f'config.batch_size = {config.batch_size} does not divide evenly across the '
                f'{devices} devices of the mesh; choose a multiple of {devices}']
    return []


def replay_problems(config) -> List[str]:
    """The replay memory's sizes against each other and the batch (also checked by
    ``iteration.Stabilisers.from_config`` for configs built in code)."""
    size, batch = config.replay_size, config.replay_batch
    if (size > 0) != (batch > 0):
        return [f'config.replay_size = {size} and config.replay_batch = {batch}: set both '
                '(replay on) or neither (off)']
    if size % config.batch_size:
        return [f'config.replay_size = {size} must be a multiple of config.batch_size = '
                f'{config.batch_size}: every iteration writes one whole batch into the memory']
    return []


def _replay(config, devices):
    problems = replay_problems(config)
    if (config.replay_size > 0) != (config.replay_batch > 0):
        return problems  # one of the two set alone: that is the problem to fix first
    batch = config.replay_batch
    if batch % devices:
        problems.append(f'config.replay_batch = {batch} does not divide evenly across the '
                        f'{devices} devices of the mesh; choose a multiple of {devices}')
    return problems


CROSS_CHECKS = {
    'zero_shot': ((('batch_size',), _batch_splits_over_devices),
                  (('batch_size', 'replay_size', 'replay_batch'), _replay)),
    'teacher': ((('batch_size',), _batch_splits_over_devices),),
    'few_shot': ((('batch_size',), _batch_splits_over_devices),),
    'belief': (),  # its batches are rounded up to the devices
}


# ----------------------------------------------------------------------------------------------

def _get(config, dotted: str):
    node = config
    for part in dotted.split('.'):
        if not hasattr(node, 'keys') or part not in node.keys():
            return MISSING
        node = node[part]
    return node


def problems_of(config, devices: int = 1) -> List[str]:
    """One line per field of ``config`` that its job cannot use (empty: all fine)."""
    job = _get(config, 'job')
    if job not in JOBS:
        return [f'config.job = {job if job is MISSING else repr(job)}; choose one of '
                + ', '.join(map(repr, JOBS))]
    problems, bad = [], set()
    for rule in RULES[job]:
        value = _get(config, rule.field)
        allowed = rule.allowed() if callable(rule.allowed) else rule.allowed
        if value is MISSING:
            if not rule.optional:
                problems.append(f'config.{rule.field} is missing; it must be {allowed}')
                bad.add(rule.field)
        elif not rule.ok(value):
            problems.append(f'config.{rule.field} = {value!r}; it must be {allowed}')
            bad.add(rule.field)
    for fields, check in CROSS_CHECKS[job]:
        if not bad.intersection(fields):
            problems.extend(check(config, devices))
    return problems


def validate(config, devices: Optional[int] = None) -> None:
    """ConfigError naming every field of ``config`` that its job cannot use. ``devices``: the
    device count the batches are split over (default: every device of every process)."""
    if devices is None:
        import jax
        devices = jax.device_count()
    problems = problems_of(config, devices)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f'{len(problems)} config fields cannot be used:\n  '
                          + '\n  '.join(problems))


def check_writable(path: str, what: str = '--workdir') -> None:
    """Create ``path`` (and its parents) and write and delete a small file in it: a UserError
    naming it if that fails, before any work that would be lost for want of a place to save it."""
    from etils import epath
    import jax
    directory = epath.Path(path)
    probe = directory / f'.zskt_write_test.{jax.process_index()}.{os.getpid()}'
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text('')
        probe.unlink()
    except Exception as error:  # noqa: BLE001 - OSError locally, the storage's own errors on gs://
        reason = getattr(error, 'strerror', None) or str(error)
        raise UserError(f'{what}={path} cannot be created or written ({type(error).__name__}: '
                        f'{reason}). Choose a directory you can write to.') from None


def writes(config, workdir: str) -> Sequence[tuple]:
    """(path, what) of each directory the job writes: its workdir, and where a teacher job puts
    the teacher when that is not under the workdir."""
    places = [(workdir, '--workdir')]
    if _get(config, 'job') == 'teacher' and _get(config, 'teacher.checkpoint'):
        places.append((config.teacher.checkpoint, '--config.teacher.checkpoint'))
    return places


def check(config, workdir: str, devices: Optional[int] = None) -> None:
    """Everything checked before a job starts: the config's fields, then its directories."""
    validate(config, devices)
    for path, what in writes(config, workdir):
        check_writable(path, what)
