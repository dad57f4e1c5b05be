"""The one error type for people: something the person running a job can put right (a teacher
or dataset that is not there, a checkpoint that does not fit, a config field that does not exist).

The launchers (``run.py``, ``scripts/seeds.py``) print its message and exit with status 2, with no
traceback; ``--verbose`` or ``ZSKT_VERBOSE=1`` shows the traceback too. Every other exception is a
bug of the code and keeps its traceback.
"""
import os
import sys

EXIT_STATUS = 2
VERBOSE_ENV = 'ZSKT_VERBOSE'


class UserError(Exception):
    """A problem the message explains and the person running the job can fix."""


class ConfigError(UserError, ValueError):
    """A config field with a value the job cannot use."""


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced NaN or inf; the message says where the last good states are saved."""


def exit_for_people(error: UserError, verbose: bool = False):
    """Print ``error`` for the person who ran the command and exit with EXIT_STATUS; with
    ``verbose`` (the launcher's --verbose) or ZSKT_VERBOSE set, re-raise it, traceback and all."""
    if verbose or os.environ.get(VERBOSE_ENV, '0').lower() not in ('', '0', 'false'):
        raise error
    print(f'Error: {error}', file=sys.stderr, flush=True)
    print(f'(--verbose or {VERBOSE_ENV}=1 shows where it was raised)', file=sys.stderr, flush=True)
    sys.exit(EXIT_STATUS)
