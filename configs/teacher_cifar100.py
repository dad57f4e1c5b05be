"""CIFAR-100 teacher from scratch: CIFAR-10's recipe (configs/teacher_cifar10.py; 200 epochs, SGD,
lr 0.1 / 5 at epochs 60, 120, 160, crop + flip) on CIFAR-100. Not in the paper.

  python run.py --config=configs/teacher_cifar100.py [--config.teacher.arch=WRN-16-2]
writes runs/teacher_cifar100_{arch}/teacher, where configs/cifar100.py looks for it.
"""
from configs import teacher_cifar10


def get_config():
    config = teacher_cifar10.get_config()
    config.dataset = 'cifar100'
    return config
