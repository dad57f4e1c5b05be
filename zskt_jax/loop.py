"""What every training job shares: its run directory (checkpoints resumed with the config checks
and saved with the run's record, the wall clock summed over resumes, the evaluation history,
TensorBoard, results.json) and the training loop (cadence of logs, evaluations and checkpoints,
the NaN stop that keeps the last finite states, preemption and ``stop_after``).

Each job keeps what is its own: its states, its compiled step, its evaluation, its results.
"""
import logging
import os
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from zskt_jax import checkpoints, reporting
from zskt_jax.errors import NonFiniteLossError
from zskt_jax.preemption import PreemptionGuard

logger = logging.getLogger('zskt_jax')


class RunDir:
    """A job's workdir: ``checkpoints/``, ``tensorboard/``, ``results.json``.

    A checkpoint resumes only into a run of the same configuration (every field but those
    listed in checkpoints.MAY_CHANGE_ON_RESUME). ``record`` holds the job's own fields of every
    checkpoint's record (teacher path and checksum, ...); the config, the step, the history and
    the wall time are added here.
    """

    def __init__(self, workdir: str, config, *, validate_meta: Optional[Callable] = None,
                 defaults: Optional[Dict] = None, unit: str = 'iteration'):
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.unit = unit
        self.is_main = jax.process_index() == 0
        self.config_dict = config.to_dict()
        self.clock = reporting.RunClock()  # wall time, summed over resumes
        self.history = []
        self.record = {}
        self.checkpoints = checkpoints.RunCheckpoints(os.path.join(workdir, 'checkpoints'),
                                                      config.keep_checkpoints)
        self._restore_options = dict(fallback=config.resume_fallback,
                                     validate_meta=validate_meta, defaults=defaults)
        self.writer = reporting.metric_writer(os.path.join(workdir, 'tensorboard'),
                                              active=self.is_main)

    def restore(self, target) -> Tuple[int, Any, Dict]:
        """(start step, saved states or None, the checkpoint's record) of the latest checkpoint
        of another run of this configuration; the history and the clock continue from it."""
        try:
            step, saved, meta = checkpoints.restore_latest(
                self.checkpoints, target, self.config_dict, **self._restore_options)
        except BaseException:
            self._close()  # the job stops here: its checkpoint manager and writer too
            raise
        if saved is None:
            return 0, None, {}
        self.history = meta.get('history', [])
        self.clock.resume(meta)
        logger.info('Resumed from %s/%d', self.checkpoints.directory, step)
        return step, saved, meta

    def save(self, step: int, state_dict, force: bool = False) -> None:
        self.checkpoints.save(step, state_dict, {
            'config': self.config_dict, self.unit: step, 'history': self.history,
            'wall_time_s': self.clock(), **self.record}, force=force)

    def stopped(self, job: str, step: int) -> Dict[str, Any]:
        """Close after a clean stop; the result says where the checkpoint is."""
        self._close()
        return checkpoints.stopped(job, self.checkpoints, step, self.unit)

    def finish(self, results: Dict[str, Any]) -> Optional[str]:
        """Close, then write ``results.json`` with the fields every job reports added."""
        self._close()
        return reporting.finish_results(self.workdir, results, wall_time_s=self.clock(),
                                        config=self.config_dict, active=self.is_main,
                                        history=self.history)

    def _close(self):
        self.checkpoints.wait()
        self.checkpoints.close()
        self.writer.close()


class Cadence(NamedTuple):
    """Every how many steps the loop logs, evaluates (0: only at the end) and checkpoints;
    ``stop_after`` > 0 stops (checkpointed) after that many steps of this run."""
    log_every: int
    eval_every: int
    checkpoint_every: int
    stop_after: int = 0

    @classmethod
    def of(cls, config, unit: str = 'iterations') -> 'Cadence':
        """The cadence fields of a config counted in ``unit`` (configs/runtime.py)."""
        return cls(config[f'log_every_{unit}'], config[f'eval_every_{unit}'],
                   config[f'checkpoint_every_{unit}'], config[f'stop_after_{unit}'])


class LoopEnd(NamedTuple):
    state: Any
    metrics: Dict[str, float]     # the last ones read
    stopped_at: Optional[int]     # the step of a clean stop (preemption, stop_after), else None


def copy_tree(tree):
    """A copy on the same devices (the states handed to a donating step are consumed)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def read_scalars(device_metrics) -> Dict[str, float]:
    """The host-side floats of a dict of device scalars (a ``read_metrics`` for train_loop)."""
    return {k: float(v) for k, v in jax.device_get(device_metrics).items()}


def is_finite(metrics: Dict[str, float]) -> bool:
    return all(np.isfinite(v) for v in metrics.values())


def train_loop(step_fn: Callable, state, start: int, total: int, cadence: Cadence, *,
               run: RunDir, state_dict: Callable, read_metrics: Callable, log: Callable,
               evaluate: Callable, progress: reporting.Progress,
               non_finite_hint: str = 'lower the learning rate') -> LoopEnd:
    """Steps ``start`` .. ``total - 1`` of a job.

    ``step_fn(state, i) -> (state, device metrics)`` runs step i (0-based); it must be a function
    of (state, i) only, and may donate the state it is given. The host does not wait for the
    steps it dispatches: it reads the metrics back (``read_metrics(device metrics) -> {name:
    float}``) only where it acts on them: ``log(done, metrics)``, ``evaluate(done, state)``,
    a checkpoint (``run.save`` of ``state_dict(state)``), a stop, the end. A non-finite metric stops the run: the states
    before the first step that produced it are saved (found by re-running the steps from the last
    states read finite) and NonFiniteLossError says where. SIGTERM / Ctrl-C and
    ``cadence.stop_after`` stop after a checkpoint. The first step is waited for, so that the
    progress report's rate and ETA leave its compilation out.
    """
    anchor = (start, copy_tree(state))  # the last states whose metrics were read finite
    metrics = {}
    with PreemptionGuard() as preemption:
        for i in range(start, total):
            state, device_metrics = step_fn(state, i)
            done = i + 1
            if i == start:
                jax.block_until_ready(device_metrics)
                progress.restart(done)  # compiled and run once: rates from here on
            stop = preemption.requested(done) or bool(
                cadence.stop_after and done - start >= cadence.stop_after)
            last = done == total
            log_now = last or done % cadence.log_every == 0
            eval_now = last or bool(cadence.eval_every and done % cadence.eval_every == 0)
            save_now = last or stop or done % cadence.checkpoint_every == 0
            if not (log_now or eval_now or save_now):
                continue
            metrics = read_metrics(device_metrics)
            if not is_finite(metrics):
                good, good_state, bad = _last_finite(step_fn, read_metrics, *anchor)
                run.save(good, state_dict(good_state), force=True)
                run.checkpoints.wait()
                bad = {k: v for k, v in bad.items() if not np.isfinite(v)}
                raise NonFiniteLossError(
                    f'Non-finite values at {run.unit} {good + 1}: {bad}. The states before it '
                    f'are saved in {run.checkpoints.directory}/{good}; {non_finite_hint}.')
            anchor = (done, copy_tree(state))
            if log_now:
                log(done, metrics)
            if eval_now:
                evaluate(done, state)
            if save_now:  # the copy, which the next step leaves alone
                run.save(done, state_dict(anchor[1]), force=stop)
            if stop and not last:
                return LoopEnd(state, metrics, done)
    return LoopEnd(state, metrics, None)


def _last_finite(step_fn, read_metrics, step: int, state):
    """Re-run from ``state`` (after ``step`` steps, read finite) one step at a time up to the
    first with non-finite metrics: (steps done before it, the states before it, its metrics)."""
    while True:
        candidate, metrics = step_fn(copy_tree(state), step)
        metrics = read_metrics(metrics)
        if not is_finite(metrics):
            return step, state, metrics
        step, state = step + 1, candidate
