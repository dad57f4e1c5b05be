"""Clean stops: SIGTERM (preemptible TPUs/VMs, schedulers) and Ctrl-C finish the current
iteration, then the job writes a checkpoint and returns; rerunning the command continues.

One process: the signals set a flag that the training loop polls. Several processes
(``jax.distributed``): the distributed runtime's preemption service receives SIGTERM on any
process, agrees with the others on the step at which all stop, and the loop asks it with
``multihost_utils.reached_preemption_sync_point`` (no communication on the steps in between);
Ctrl-C is handed to it as a SIGTERM.
"""
import logging
import os
import signal
import threading

import jax

logger = logging.getLogger('zskt_jax')


def _sync_manager():
    from jax._src import distributed  # where jax.distributed keeps its state
    return getattr(distributed.global_state, 'preemption_sync_manager', None)


class PreemptionGuard:
    """Within ``with``, a stop request is noted and ``requested(step)`` says when to stop.

    ``requested`` must be called at every step, with the step, on every process: they all
    answer True at the same step. A second Ctrl-C while stopping raises KeyboardInterrupt.
    """

    def __init__(self):
        self._requested = False
        self._previous = {}
        self._multi = jax.process_count() > 1
        if self._multi and _sync_manager() is None:
            raise RuntimeError(
                'Several JAX processes but no preemption service: start them with '
                'jax.distributed.initialize and jax_enable_preemption_service=True (the default).')

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        logger.info('Received %s: finishing the current iteration, then checkpointing.',
                    signal.Signals(signum).name)
        if self._multi:  # the preemption service listens to SIGTERM and tells the others
            os.kill(os.getpid(), signal.SIGTERM)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # Several processes: SIGTERM stays with the preemption service.
            signals = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self, step: int) -> bool:
        """True at the step where every process stops (one process: once it was signalled)."""
        if not self._multi:
            return self._requested
        from jax.experimental import multihost_utils
        return multihost_utils.reached_preemption_sync_point(step)
