"""A CIFAR-10 teacher with the zju-vipa/CMI toolbox's recipe (its train_scratch.py defaults):
200 epochs of SGD (momentum 0.9, weight decay 1e-4, batch 256), lr 0.1 divided by 10 at epochs
120, 150 and 180, random 32x32 crops of the 4-pixel padded image and horizontal flips.
  python run.py --config=configs/teacher_toolbox_cifar10.py --config.teacher.arch=resnet34
writes runs/teacher_cifar10_resnet34/teacher, where configs/toolbox_cifar10.py looks for it
(also vgg11, wrn40_2). The paper's own recipe is configs/teacher_cifar10.py.
"""
from configs import teacher_cifar10


def get_config():
    config = teacher_cifar10.get_config()
    config.teacher.arch = 'resnet34'
    config.teacher.base_width = 0     # the architecture's own
    config.batch_size = 256
    config.weight_decay = 1e-4
    config.lr_milestones = (0.6, 0.75, 0.9)  # epochs 120, 150, 180 of 200
    config.lr_decay = 0.1
    return config
