"""A CIFAR-100 teacher with the toolbox's recipe (configs/teacher_toolbox_cifar10.py)."""
from configs import teacher_toolbox_cifar10


def get_config():
    config = teacher_toolbox_cifar10.get_config()
    config.dataset = 'cifar100'
    return config
