"""Clean stops: SIGTERM (preemptible TPUs/VMs, schedulers) and Ctrl-C finish the current
iteration, then the job writes a checkpoint and returns; rerunning the command continues."""
import logging
import signal
import threading

import jax
import numpy as np

logger = logging.getLogger('zskt_jax')


class PreemptionGuard:
    """Within ``with``, SIGTERM/SIGINT only set a flag that the training loop polls.

    A second Ctrl-C while stopping falls back to Python's default (KeyboardInterrupt).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self._requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._requested = True
        logger.info('Received %s: finishing the current iteration, then checkpointing.',
                    signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def requested(self) -> bool:
        """True on every process once any process was signalled (they must stop together)."""
        if jax.process_count() == 1:
            return self._requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.asarray(self._requested))
        return bool(np.any(flags))
