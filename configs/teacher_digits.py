"""Teacher for the offline digits demo: the paper's SGD recipe, scaled to a CPU budget."""
from configs import teacher_default


def get_config():
    config = teacher_default.get_config()
    config.dataset = 'digits16'       # the default's 16x16 scans (--config.dataset=digits: 32x32)
    config.teacher.arch = 'WRN-16-1'
    config.teacher.base_width = 8     # channels 8/8/16/32: a few minutes on a 2-core CPU
    config.epochs = 30
    config.batch_size = 64
    config.learning_rate = 0.05
    config.augment = 'crop'           # no flips: digits are not mirror-symmetric
    config.convolution = 'onednn'     # oneDNN's convolutions on CPU, as configs/digits.py
    config.log_every_epochs = 5
    config.checkpoint_every_epochs = 5
    return config
