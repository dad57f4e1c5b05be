"""Few-shot KD+AT on SVHN: WRN-40-2 -> WRN-16-1, M = 200, 100 full-data epochs, no augmentation.

`--config.images_per_class=-1` is the full-data KD+AT run (95.88% in the paper).
"""
from configs import few_shot_default


def get_config():
    config = few_shot_default.get_config()
    config.dataset = 'svhn'
    config.full_data_epochs = 100     # 73,257 // 128 = 572 iterations an epoch: 57,200 iterations
    config.augment = 'none'
    config.eval_every_iterations = 572           # once per full-data epoch: 100 evaluations
    return config
