"""Orbax checkpoints: teachers (written once, loaded by every distillation) and resumable runs.

A teacher directory holds ``variables/`` (an Orbax checkpoint of {'params', 'batch_stats'}) and
``teacher.json`` (architecture, classes, dataset, accuracy). Run checkpoints live under
``{workdir}/checkpoints/{iteration}/`` with the train states and a JSON record of what produced
them; the teacher is never copied into them.
"""
import fnmatch
import hashlib
import json
import logging
import os
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from zskt_jax import paths
from zskt_jax.errors import UserError


class TeacherNotFoundError(UserError, FileNotFoundError):
    pass


class TeacherCorruptedError(UserError):
    """A teacher directory whose record or variables cannot be read."""


class CheckpointMismatchError(UserError, ValueError):
    pass


def _from_a_restore(traceback_) -> bool:
    import traceback
    frames = traceback.extract_tb(traceback_) if traceback_ is not None else []
    return any(f'{os.sep}orbax{os.sep}' in frame.filename for frame in frames)


def _is_stray_wake_up(unraisable) -> bool:
    """What TensorStore reports when a read finishes after the event loop that awaited it was
    closed: ``RuntimeError('Event loop is closed')`` from asyncio's ``call_soon_threadsafe``."""
    import traceback
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    return (unraisable.exc_type is RuntimeError
            and str(unraisable.exc_value) == 'Event loop is closed'
            and bool(frames) and frames[-1].name == '_check_closed'
            and 'asyncio' in frames[-1].filename)


class _UnretrievedRestoreErrors(logging.Filter):
    """asyncio's 'Task exception was never retrieved' for the reads of an Orbax restore."""

    def filter(self, record) -> bool:
        return not (str(record.msg).startswith(('Task exception was never retrieved',
                                                'Future exception was never retrieved'))
                    and record.exc_info and _from_a_restore(record.exc_info[2]))


def ignore_reads_left_by_a_failed_restore() -> None:
    """Keep the reads that a failed restore leaves behind from printing tracebacks.

    Orbax runs a restore in an event loop of its own and closes it as soon as one read fails
    (a corrupted checkpoint), without waiting for the restore's other reads. Those finish later
    and each prints a traceback after the error was already reported, up to the process's exit:
    TensorStore's wake-up of the closed loop (``RuntimeError: Event loop is closed``) and, when
    its task is collected, asyncio's 'Task exception was never retrieved' for a read that
    failed too. Nothing is left to do for them, and closing the checkpointer does not cancel
    them; so a ``sys.unraisablehook`` drops exactly the first (every other report goes to the
    hook before it) and a filter of the 'asyncio' logger drops the second when its traceback
    passes through Orbax. Installed once.
    """
    import sys
    previous = sys.unraisablehook
    if getattr(previous, 'drops_stray_wake_ups', False):
        return

    def hook(unraisable):
        if not _is_stray_wake_up(unraisable):
            previous(unraisable)

    hook.drops_stray_wake_ups = True
    sys.unraisablehook = hook
    logging.getLogger('asyncio').addFilter(_UnretrievedRestoreErrors())


def barrier(name: str) -> None:
    """Every process waits here for the others (after a write by process 0 that they read)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def variables_checksum(variables) -> str:
    """sha256 over every leaf's path, dtype, shape and bytes: identifies a teacher exactly."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.asarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f'{array.dtype}{array.shape}'.encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_teacher(path: str, variables: Dict[str, Any], meta: Dict[str, Any]) -> None:
    """Write a teacher: its variables and a description the distillation job validates."""
    path = paths.absolute(path)
    epath.Path(path).mkdir(parents=True, exist_ok=True)
    variables = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, 'variables'), jax.device_get(variables), force=True)
    checkpointer.wait_until_finished()
    meta = dict(meta, checksum=variables_checksum(variables))
    if jax.process_index() == 0:
        paths.write_text(os.path.join(path, 'teacher.json'),
                         json.dumps(meta, indent=2, sort_keys=True))
    barrier(f'teacher written to {path}')


def load_teacher(path: str, make_hint: str = ''):
    """(variables, meta) of the teacher at ``path``; a clear error if there is none."""
    path = paths.absolute(path)
    meta_path = epath.Path(path) / 'teacher.json'
    if not meta_path.exists() or not (epath.Path(path) / 'variables').is_dir():
        raise TeacherNotFoundError(
            f'No teacher checkpoint at {path} (expected {meta_path} and variables/).'
            + (f' Make one with:\n  {make_hint}' if make_hint else ''))
    ignore_reads_left_by_a_failed_restore()
    try:
        meta = json.loads(meta_path.read_text())
        with ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(os.path.join(path, 'variables'))
    except Exception as error:  # noqa: BLE001 - whatever Orbax/TensorStore/json raise for it
        raise TeacherCorruptedError(
            f'The teacher at {path} cannot be read ({type(error).__name__}: {str(error)[:200]}); '
            'it is truncated or corrupted. Nothing was deleted.'
            + (f' Remake it with:\n  {make_hint}' if make_hint else '')) from error
    return variables, meta


def check_teacher(meta: Dict[str, Any], *, num_classes: int, image_shape, teacher_arch: str,
                  teacher_base_width: int, path: str) -> None:
    """The teacher must classify the evaluation dataset's classes at its image size, and be the
    architecture the config names."""
    problems = []
    if meta.get('num_classes') != num_classes:
        problems.append(f"it has {meta.get('num_classes')} classes but the dataset has {num_classes}")
    if tuple(meta.get('image_shape', ())) != tuple(image_shape):
        problems.append(f"it takes images of shape {tuple(meta.get('image_shape', ()))} but the "
                        f'dataset has {tuple(image_shape)}')
    if meta.get('arch') != teacher_arch or meta.get('base_width', 16) != teacher_base_width:
        problems.append(f"it is {meta.get('arch')} (base width {meta.get('base_width', 16)}) but "
                        f'config.teacher says {teacher_arch} (base width {teacher_base_width})')
    if problems:
        raise CheckpointMismatchError(f'Teacher at {path} does not fit this run: '
                                      + '; '.join(problems) + '.')


class RunCheckpoints:
    """Periodic, asynchronous, atomically finalised checkpoints of a run's train states."""

    def __init__(self, directory: str, keep: int, async_save: bool = True):
        self.directory = paths.absolute(directory)
        ignore_reads_left_by_a_failed_restore()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Dict[str, Any], meta: Dict[str, Any], force=False) -> None:
        if step in self.manager.all_steps():
            return  # already saved (e.g. a stop right after a periodic save)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore_meta(self, step: int) -> Dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore(self, step: int, target: Dict[str, Any]) -> Dict[str, Any]:
        """Restore onto the shardings and shapes of ``target`` (any mesh)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract))).state

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


# Config fields that may differ between a checkpoint and the run resuming from it (patterns of
# dotted names: cadence, where things are, how the same numbers are computed); every other
# field must be equal, so that a field added to a config is checked without being listed.
MAY_CHANGE_ON_RESUME = ('data_dir', 'eval_batch_size', 'log_every_*', 'eval_every_*',
                        'checkpoint_every_*', 'keep_checkpoints', 'resume_fallback',
                        'stop_after_*', 'update_loop', 'weight_grad_chunk', 'convolution',
                        'teacher.checkpoint',  # the teacher itself is compared by checksum
                        'teacher.recipe')


def resume_fields(config_dict: Dict[str, Any], may_change=MAY_CHANGE_ON_RESUME) -> Tuple[str, ...]:
    """The dotted fields of a config (as a dict) that a checkpoint's config must equal."""
    def dotted(d, prefix=''):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from dotted(value, f'{prefix}{key}.')
            else:
                yield prefix + key
    return tuple(f for f in dotted(config_dict)
                 if not any(fnmatch.fnmatchcase(f, pattern) for pattern in may_change))


def compare_configs(saved: Dict[str, Any], current: Dict[str, Any], fields,
                    defaults: Optional[Dict[str, Any]] = None) -> list:
    """The dotted fields whose values differ between a checkpoint's config and this run's.

    ``defaults``: the value a field had implicitly in checkpoints written before it existed
    (a field absent from the checkpoint's config is compared as that value)."""
    current = json.loads(json.dumps(current))  # as it would be saved: tuples become lists
    defaults = defaults or {}
    def get(d, dotted, default='<absent>'):
        for part in dotted.split('.'):
            if not isinstance(d, dict) or part not in d:
                return default
            d = d[part]
        return d
    return [f'{f}: checkpoint {get(saved, f, defaults.get(f, "<absent>"))!r}, now '
            f'{get(current, f)!r}'
            for f in fields if get(saved, f, defaults.get(f, '<absent>')) != get(current, f)]


class CheckpointCorruptedError(UserError, RuntimeError):
    pass


def restore_latest(run_checkpoints: RunCheckpoints, target: Dict[str, Any], config_dict,
                   *, fallback: bool = False, validate_meta=None, defaults=None):
    """Restore the newest checkpoint of a run, refusing any that another configuration wrote.

    Every field of ``config_dict`` but those of MAY_CHANGE_ON_RESUME must equal the checkpoint's
    (``defaults``: see compare_configs). Returns (step, state, meta), or (None, None, None) for
    a fresh run. A checkpoint that cannot
    be read is reported; with ``fallback`` the newest intact earlier one is used instead and the
    unreadable one is moved aside (renamed, never deleted) so that the run can save past it.
    """
    import logging
    logger = logging.getLogger('zskt_jax')
    steps = sorted(run_checkpoints.manager.all_steps(), reverse=True)
    for position, step in enumerate(steps):
        try:
            meta = run_checkpoints.restore_meta(step)
        except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is reported
            meta, failure = None, error
        if meta is not None:
            differences = compare_configs(meta.get('config', {}), config_dict,
                                          resume_fields(config_dict), defaults)
            if differences:
                raise CheckpointMismatchError(
                    f'The checkpoint at {run_checkpoints.directory}/{step} was written by another '
                    'configuration:\n  ' + '\n  '.join(differences) +
                    '\nUse another --workdir, or the configuration it was written with.')
            if validate_meta is not None:
                validate_meta(meta)
            try:
                return step, run_checkpoints.restore(step, target), meta
            except Exception as error:  # noqa: BLE001
                failure = error
        older = steps[position + 1:]
        location = f'{run_checkpoints.directory}/{step}'
        if not fallback:
            raise CheckpointCorruptedError(
                f'The latest checkpoint {location} cannot be read ({type(failure).__name__}: '
                f'{str(failure)[:300]}). Nothing was deleted. '
                + (f'Rerun with --config.resume_fallback=True to continue from the newest intact '
                   f'earlier checkpoint (steps {older}).' if older else
                   'There is no earlier checkpoint; use a new --workdir to start afresh.'))
        aside = f'{location}.corrupted'
        logger.warning('Checkpoint %s cannot be read (%s); moved to %s, trying the previous one.',
                       location, type(failure).__name__, aside)
        if jax.process_index() == 0:
            epath.Path(location).rename(aside)
        barrier(f'{location} moved aside')
        run_checkpoints.manager.reload()
    return None, None, None


def same_teacher_as(teacher_meta: Dict[str, Any], teacher_path: str):
    """A ``validate_meta`` for restore_latest: the run must continue with the teacher it began
    with (compared by checksum of its variables)."""
    def validate(meta):
        if meta.get('teacher_checksum') != teacher_meta['checksum']:
            raise CheckpointMismatchError(
                f'The teacher at {teacher_path} is not the one this run started '
                f"with (checksum {teacher_meta['checksum'][:12]}..., recorded "
                f"{str(meta.get('teacher_checksum'))[:12]}... for {meta.get('teacher_path')}).")
    return validate


def stopped(job: str, run_checkpoints: RunCheckpoints, step: int, what: str = 'iteration'):
    """Report a clean stop (preemption or stop_after): where the checkpoint is, how to go on."""
    import logging
    location = f'{run_checkpoints.directory}/{step}'
    logging.getLogger('zskt_jax').info(
        'Stopped after %s %d; checkpoint written to %s. Rerun the same command to continue.',
        what, step, location)
    return {'job': job, 'stopped_at': step, 'checkpoint': location}
