"""Zero-shot distillation on CIFAR-100: not in the paper, which reports SVHN and CIFAR-10 only.

Everything is CIFAR-10's setting (configs/cifar10.py: WRN-40-2 -> WRN-16-1, N = 80,000, the
paper's optimisers, losses and beta); only the dataset (100 classes) differs. Nothing has been
tuned for it. The teacher is read from runs/teacher_cifar100_{teacher.arch}/teacher
(configs/teacher_cifar100.py).
"""
from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.dataset = 'cifar100'
    return config
