"""Teacher training from scratch, the paper's recipe (docs/method.md, section "Teachers")."""
import ml_collections

from configs import runtime


def get_config():
    config = ml_collections.ConfigDict()
    config.job = 'teacher'
    config.seed = 0
    config.dataset = 'svhn'
    config.data_dir = ''              # TFDS data dir; '' = TFDS's default
    config.teacher = ml_collections.ConfigDict()
    config.teacher.arch = 'WRN-40-2'
    config.teacher.base_width = 16
    config.teacher.checkpoint = ''    # where the teacher is written; '' = {workdir}/teacher
    config.epochs = 100               # SVHN 100, CIFAR-10 200
    config.batch_size = 128
    config.learning_rate = 0.1
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4        # coupled L2 as torch SGD, on every parameter
    config.lr_milestones = (0.3, 0.6, 0.8)  # fractions of the run where lr is multiplied by lr_decay
    config.lr_decay = 0.2
    config.augment = 'none'           # none | crop | crop_flip (CIFAR: crop_flip)
    runtime.add(config, unit='epochs', log_every=1, checkpoint_every=1, keep_checkpoints=2,
                stop_unit='steps')
    return config
