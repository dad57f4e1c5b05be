"""CIFAR-10 teacher from scratch, the paper's recipe (docs/method.md, section "Teachers"): 200
epochs of SGD (momentum 0.9, weight decay 5e-4, batch 128), lr 0.1 divided by 5 at 30%, 60% and 80%
of the run (epochs 60, 120, 160), random 32x32 crops of the 4-pixel zero-padded image and horizontal
flips, done on device.

  python run.py --config=configs/teacher_cifar10.py [--config.teacher.arch=WRN-40-1]
writes runs/teacher_cifar10_{arch}/teacher, where configs/cifar10.py looks for it.
"""
from configs import teacher_default


def get_config():
    config = teacher_default.get_config()
    config.dataset = 'cifar10'
    config.teacher.arch = 'WRN-40-2'
    config.epochs = 200
    config.augment = 'crop_flip'
    return config
