"""The field's benchmark on CIFAR-10: the five pairs of the zju-vipa/CMI toolbox (DFQ, CMI, Fast
and later papers report them), with the paper's loop (docs/reproducing.md, "The field's
benchmark"). ResNet-34 -> ResNet-18 here; the other four are overrides:
  --config.teacher.arch=vgg11                                   (VGG-11 -> ResNet-18)
  --config.teacher.arch=wrn40_2 --config.student.arch=wrn16_1   (also wrn40_1, wrn16_2)
The later methods are presets on top (docs/methods.md): --config.method=dfq, dafl, dfad, robust.
Networks at the toolbox's widths (base_width 0: the architecture's own). Attention transfer
compares the stages of equal size: all four layers of the ResNet pair, three stages of every
other pair.
The teacher is read from runs/teacher_cifar10_{arch}/teacher: import the toolbox's published
one (python -m zskt_jax.import_torch --checkpoint=cifar10_resnet34.pth --arch=resnet34
--dataset=cifar10) or train it with the toolbox's recipe (configs/teacher_toolbox_cifar10.py).
"""
from configs import cifar10


def get_config():
    config = cifar10.get_config()
    config.teacher.arch = 'resnet34'
    config.teacher.base_width = 0     # the architecture's own: 64 (ResNet, VGG), 16 (WRN)
    config.student.arch = 'resnet18'
    config.student.base_width = 0
    return config
