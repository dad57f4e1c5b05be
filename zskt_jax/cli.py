"""The command line: ``zskt-jax --config=configs/digits.py [--workdir=runs/digits]
[--config.n_s=5]``, the same as ``python -m zskt_jax ...`` and ``python run.py ...``.

Parses flags, starts JAX (multi-host where asked), picks the job from ``config.job`` and hands it
``(config, workdir)`` (``launch.main``). Importing this module defines the flags (absl's global
FLAGS); ``scripts/seeds.py`` imports it for the same --config, --workdir and --verbose.

Several processes (a TPU pod slice, several GPU hosts): run the same command on every host. On a
TPU VM JAX finds the other workers itself; elsewhere pass --coordinator_address, --num_processes
and --process_id (or ZSKT_COORDINATOR_ADDRESS, ZSKT_NUM_PROCESSES, ZSKT_PROCESS_ID), or
--distributed=on where JAX detects the cluster (SLURM, Open MPI, Kubernetes). See docs/parallel.md.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from zskt_jax import launch

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file; override fields with '
                                '--config.FIELD=VALUE.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Output directory (checkpoints, TensorBoard, results.json). '
                    'Default: runs/<config file name>.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 in a multi-process run '
                    '(env ZSKT_COORDINATOR_ADDRESS). Not needed on a TPU VM.')
flags.DEFINE_integer('num_processes', None, 'Number of processes of a multi-process run '
                     '(env ZSKT_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 '
                     '(env ZSKT_PROCESS_ID).')
flags.DEFINE_enum('distributed', None, ['auto', 'on', 'off'], 'Call jax.distributed.initialize(): '
                  'auto (default; env ZSKT_DISTRIBUTED) when the three settings above are given or '
                  'on a TPU VM; on: always (JAX detects SLURM, Open MPI, Kubernetes, TPU); off: never.')
flags.DEFINE_bool('verbose', False, 'Show the traceback of the errors meant for people (a missing '
                  'teacher, a checkpoint of another configuration, ...); env ZSKT_VERBOSE=1 too.')
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    launch.main(FLAGS.config, config_flags.get_config_filename(FLAGS['config']), FLAGS.workdir,
                coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id, distributed=FLAGS.distributed, verbose=FLAGS.verbose,
                overridden=launch.overridden_fields(sys.argv[1:]))


def run(command=main):
    """The console entry point (and scripts/seeds.py's, with its own ``command``): --config found
    from any directory (``launch.find_config_file``), an unknown --config.FIELD stopped before
    JAX starts, TensorFlow's start-up lines kept out of the output, then ``command``."""
    sys.argv[1:] = launch.resolve_config_argv(sys.argv[1:])
    launch.check_overrides_or_exit(sys.argv[1:])
    from zskt_jax import data  # TFDS's import: not on the path of the checks above
    data.quiet_tensorflow()
    app.run(command)
