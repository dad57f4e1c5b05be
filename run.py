"""Entry point: python run.py --config=configs/digits.py [--workdir=runs/digits] [--config.n_s=5]

The same command as ``zskt-jax`` and ``python -m zskt_jax`` once the project is installed
(``pip install .``): the flags and everything else live in ``zskt_jax`` (``zskt_jax/cli.py``).

Several processes (a TPU pod slice, several GPU hosts): run the same command on every host. On a
TPU VM JAX finds the other workers itself; elsewhere pass --coordinator_address, --num_processes
and --process_id (or ZSKT_COORDINATOR_ADDRESS, ZSKT_NUM_PROCESSES, ZSKT_PROCESS_ID), or
--distributed=on where JAX detects the cluster (SLURM, Open MPI, Kubernetes). See docs/parallel.md.
"""
from zskt_jax import cli  # noqa: F401  (defines the flags)

if __name__ == '__main__':
    cli.run()
