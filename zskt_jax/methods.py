"""The data-free distillation methods after ZSKT, by name, as presets of this project's one loop.

A preset is a set of the zero-shot config's existing fields (the stabilisers of docs/method.md,
section "Stabilisers"), chosen with ``--config.method=NAME`` on top of any pair, resolved
once when the run starts (``resolve``), logged, and saved with the run (``results.json`` and every
checkpoint hold the resolved config). A field given on the command line wins over the preset.
The iteration, optimisers and schedules stay this project's (docs/methods.md says what that
leaves out of each method).

The weights come from the zju-vipa/CMI toolbox's scripts (``scripts/{method}/*.sh``), whose
generator loss is ``bn * L_bn + oh * L_oh + balance * L_balance - adv * KL`` with the KL averaged
over the batch only (``datafree/criterions.py``, ``kldiv(reduction='batchmean')``). This
project's KL is averaged over batch x classes (docs/method.md, section "Losses"), i.e. the
toolbox's divided by the number of classes C, and its generator loss weighs it by 1. Dividing the
toolbox's whole loss by ``adv * C`` gives this project's form with each weight divided by
``adv * C``; Adam is invariant to that overall scale (up to its epsilon and the gradient clipping),
so the translated weights keep the toolbox's balance between the terms. The toolbox's DFQ and
DAFL scripts use adv 1, bn 1, oh 1, balance 20, so on CIFAR-10 (C = 10) the weights here are
bn 0.1, one-hot 0.1, balance 2.0, and a tenth of those on CIFAR-100.
"""
import logging
from typing import Callable, Dict, Iterable, NamedTuple

from zskt_jax.errors import ConfigError

logger = logging.getLogger('zskt_jax')

# The fields a preset sets (every other field keeps the config's value).
FIELDS = ('adversarial_loss', 'bn_weight', 'balance_weight', 'one_hot_weight', 'replay_size',
          'replay_batch', 'student_augment')

# The toolbox's script weights (adv, bn, oh, balance) of scripts/dfq/dfq_cifar10_wrn402_wrn161.sh
# and scripts/dafl/dafl_cifar10_wrn402_wrn161.sh.
TOOLBOX_BN, TOOLBOX_ONE_HOT, TOOLBOX_BALANCE = 1.0, 1.0, 20.0
# This project's replay memory in the robust preset: the last 64 generated batches.
REPLAY_BATCHES = 64


class Preset(NamedTuple):
    summary: str
    fields: Callable[[int, int], Dict]  # (num_classes, batch_size) -> {field: value}
    sources: Dict[str, str]             # field -> where its value comes from, one line


def _terms(num_classes: int, bn: bool, one_hot: bool, balance: bool) -> Dict:
    """The toolbox's generator-loss weights in this project's KL scale (divided by adv * C, with
    the toolbox's adv = 1)."""
    return dict(bn_weight=TOOLBOX_BN / num_classes if bn else 0.0,
                one_hot_weight=TOOLBOX_ONE_HOT / num_classes if one_hot else 0.0,
                balance_weight=TOOLBOX_BALANCE / num_classes if balance else 0.0)


_OFF = dict(replay_size=0, replay_batch=0, student_augment='none')
_NO_MEMORY = {'replay_size': 'no memory: off', 'replay_batch': 'no memory: off',
              'student_augment': 'the student sees the generated images as they are: off'}
_PAPER = 'the paper (Micaelli & Storkey 2019, Algorithm 1): off'
_TOOLBOX = ('toolbox scripts/{script}: {name} {value:g}, divided by the number of classes '
            '(this project\'s KL scale)')

PRESETS: Dict[str, Preset] = {
    'zskt': Preset(
        "the paper's loop: KL(T || S) both ways, nothing added",
        lambda c, b: dict(adversarial_loss='kl', **_terms(c, False, False, False), **_OFF),
        {field: _PAPER for field in FIELDS}),
    'dfad': Preset(
        'DFAD (Fang et al. 2019): the mean absolute logit difference in place of the KL',
        lambda c, b: dict(adversarial_loss='l1', **_terms(c, False, False, False), **_OFF),
        {'adversarial_loss': "DFAD; the toolbox's datafree_kd.py: torch.nn.L1Loss() for dfad",
         **{field: 'DFAD adds no generator term: off' for field in FIELDS[1:]}}),
    'dafl': Preset(
        "DAFL-style (Chen et al. 2019): the adversarial loop plus DAFL's one-hot and class-balance "
        'terms on the generator',
        lambda c, b: dict(adversarial_loss='kl', **_terms(c, False, True, True), **_OFF),
        {'adversarial_loss': 'kept from ZSKT (DAFL itself trains no adversary: adv 0)',
         'bn_weight': 'DAFL has no BatchNorm term: off',
         'one_hot_weight': _TOOLBOX.format(script='dafl/dafl_cifar10_wrn402_wrn161.sh',
                                           name='oh', value=TOOLBOX_ONE_HOT),
         'balance_weight': _TOOLBOX.format(script='dafl/dafl_cifar10_wrn402_wrn161.sh',
                                           name='balance', value=TOOLBOX_BALANCE),
         **_NO_MEMORY}),
    'dfq': Preset(
        'DFQ (Choi et al. 2020) as the toolbox runs it: BatchNorm statistics, one-hot and class '
        'balance on the generator',
        lambda c, b: dict(adversarial_loss='kl', **_terms(c, True, True, True), **_OFF),
        {'adversarial_loss': 'toolbox scripts/dfq/dfq_cifar10_wrn402_wrn161.sh: adv 1, KL',
         'bn_weight': _TOOLBOX.format(script='dfq/dfq_cifar10_wrn402_wrn161.sh', name='bn',
                                      value=TOOLBOX_BN),
         'one_hot_weight': _TOOLBOX.format(script='dfq/dfq_cifar10_wrn402_wrn161.sh', name='oh',
                                           value=TOOLBOX_ONE_HOT),
         'balance_weight': _TOOLBOX.format(script='dfq/dfq_cifar10_wrn402_wrn161.sh',
                                           name='balance', value=TOOLBOX_BALANCE),
         **_NO_MEMORY}),
    'robust': Preset(
        "the stabilisers of this project's digits default (which doubles bn_weight): DFQ's "
        'terms plus a replay memory of past generated images on the student side, shifted at '
        'random as CMI reads its pool',
        lambda c, b: dict(adversarial_loss='kl', **_terms(c, True, True, True),
                          replay_size=REPLAY_BATCHES * b, replay_batch=b, student_augment='crop'),
        {'adversarial_loss': 'as dfq', 'bn_weight': 'as dfq', 'one_hot_weight': 'as dfq',
         'balance_weight': 'as dfq',
         'replay_size': f"CMI's image pool (toolbox datafree/utils: ImagePool): the last "
                        f'{REPLAY_BATCHES} batches',
         'replay_batch': 'as many replayed images as new ones in every student batch',
         'student_augment': "CMI reads its pool through the teachers' training transform "
                            "(toolbox datafree_kd.py: transform=ori_dataset.transform): shifts "
                            'of up to H/8 pixels'}),
}


def names() -> Iterable[str]:
    return sorted(PRESETS)


def preset_fields(name: str, num_classes: int, batch_size: int) -> Dict:
    """The fields preset ``name`` sets for a dataset of ``num_classes`` and a batch size."""
    if name not in PRESETS:
        raise ConfigError(f"config.method = {name!r}; choose one of {', '.join(names())} "
                          "(or '' for the config's own fields; docs/methods.md)")
    return PRESETS[name].fields(num_classes, batch_size)


def resolve(config, overridden: Iterable[str] = ()) -> Dict:
    """Set the fields of ``config.method``'s preset on ``config`` (a zero-shot config), except the
    ones named in ``overridden`` (fields given on the command line), and log them. Returns the
    resolved fields ({} when ``config.method`` is '' or absent: the config's own fields)."""
    name = config.get('method', '') if hasattr(config, 'get') else ''
    if not name or config.get('job', 'zero_shot') != 'zero_shot':
        return {}
    from zskt_jax import data
    fields = preset_fields(name, data.dataset_info(config.dataset).num_classes,
                           config.batch_size)
    overridden = set(overridden)
    for field, value in fields.items():
        if field not in overridden:
            config[field] = value
    resolved = {field: config[field] for field in FIELDS}
    logger.info('method %s (%s): %s', name, PRESETS[name].summary, ', '.join(
        f'{field}={value!r}' + (' (command line)' if field in overridden else '')
        for field, value in resolved.items()))
    return resolved

