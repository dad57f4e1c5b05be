"""Transition curves on the offline digits data (360 test images, so every agreeing one).

    python run.py --config=configs/belief_digits.py --config.student_workdir=runs/digits \
        --workdir=runs/belief_digits
"""
from configs import belief_default


def get_config():
    config = belief_default.get_config()
    config.student_workdir = 'runs/digits'  # the default workdir of configs/digits.py
    config.num_images = -1            # the digits test split has 360 images: every agreeing one
    config.batch_size = 540           # 60 images x 9 targets per compiled call
    config.eval_batch_size = 360
    config.log_every_chunks = 1       # a progress line per chunk (minutes each on a 2-core CPU)
    return config
