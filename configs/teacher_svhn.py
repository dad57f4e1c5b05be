"""SVHN teacher from scratch, the paper's recipe (docs/method.md, section "Teachers"): 100 epochs of
SGD (momentum 0.9, weight decay 5e-4, batch 128), lr 0.1 divided by 5 at 30%, 60% and 80% of the run
(epochs 30, 60, 80), no augmentation, on the 73,257 'train' images (not 'extra').

  python run.py --config=configs/teacher_svhn.py [--config.teacher.arch=WRN-16-2]
writes runs/teacher_svhn_{arch}/teacher, where configs/svhn.py looks for it.
"""
from configs import teacher_default


def get_config():
    config = teacher_default.get_config()
    config.dataset = 'svhn'
    config.teacher.arch = 'WRN-40-2'
    config.epochs = 100
    config.augment = 'none'
    return config
