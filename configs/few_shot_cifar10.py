"""Few-shot KD+AT on CIFAR-10: WRN-40-2 -> WRN-16-1, M = 200, 200 full-data epochs, crop + flip.

Other pairs: --config.teacher.arch=WRN-16-2 --config.student.arch=WRN-16-2 ... "ours + M" (the
paper's 85.91% for M = 100): --config.images_per_class=100 --config.init_student_from=<zero-shot
workdir>.
"""
from configs import few_shot_default


def get_config():
    config = few_shot_default.get_config()
    config.dataset = 'cifar10'
    config.full_data_epochs = 200     # 50,000 // 128 = 390 iterations an epoch: 78,000 iterations
    config.augment = 'crop_flip'      # the CIFAR-10 teachers' augmentation
    config.eval_every_iterations = 780           # every 2 full-data epochs: 100 evaluations
    return config
