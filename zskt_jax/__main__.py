"""``python -m zskt_jax --config=configs/digits.py ...``: the ``zskt-jax`` command (cli.py)."""
from zskt_jax import cli

if __name__ == '__main__':
    cli.run()
