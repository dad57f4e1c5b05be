"""The field's benchmark on CIFAR-100: configs/toolbox_cifar10.py's pairs and settings on the
100 classes (teachers: runs/teacher_cifar100_{arch}/teacher; import the toolbox's
cifar100_{arch}.pth, or train with configs/teacher_toolbox_cifar100.py)."""
from configs import toolbox_cifar10


def get_config():
    config = toolbox_cifar10.get_config()
    config.dataset = 'cifar100'
    return config
