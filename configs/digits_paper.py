"""The paper's method alone at the digits default's sizes: configs/digits.py with every
stabiliser off (ZSKT's KL game, no BatchNorm-statistics, balance or one-hot term, no replay),
so that the faithful loop stays one command away and is measured beside the default
(docs/robustness.md).

    python run.py --config=configs/digits_paper.py
"""
from configs import default, digits
from zskt_jax.zero_shot import Stabilisers


def get_config():
    config = digits.get_config()
    paper = default.get_config()
    for field in Stabilisers._fields:
        config[field] = paper[field]
    return config
