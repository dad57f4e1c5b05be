"""Few-shot KD+AT baseline, the paper's recipe (docs/method.md, section "Few-shot
baseline KD+AT").

Teacher and student as the zero-shot default (configs/default.py), the teacher's SGD recipe
(configs/teacher_default.py); dataset configs start here and change what differs.
"""
import ml_collections

from configs import default, runtime, teacher_default


def get_config():
    zero_shot = default.get_config()
    sgd = teacher_default.get_config()
    config = ml_collections.ConfigDict()
    config.job = 'few_shot'
    config.seed = 0                   # student init, the M-per-class draw and the batch order
    config.dataset = zero_shot.dataset
    config.data_dir = ''              # TFDS data dir; '' = TFDS's default
    config.teacher = ml_collections.ConfigDict()
    config.teacher.arch = zero_shot.teacher.arch
    config.teacher.base_width = zero_shot.teacher.base_width
    config.teacher.checkpoint = ''    # teacher directory; '' = runs/teacher_{dataset}_{arch}/teacher
    config.teacher.recipe = ''        # a teacher config file run first when the teacher is missing
    config.student = ml_collections.ConfigDict()
    config.student.arch = zero_shot.student.arch
    config.student.base_width = zero_shot.student.base_width

    config.images_per_class = 200     # M: the first M of each class after a seeded shuffle; -1 = all
    config.init_student_from = ''     # a zero-shot run's workdir: fine-tune its student ("ours + M")
    # The schedule: as many iterations as the full-data run, whatever M (docs/method.md).
    config.full_data_epochs = sgd.epochs  # epochs of the full-data run (SVHN 100, CIFAR-10 200)
    config.scale_iterations = 1.0     # the authors' scale_n_iters; 1 for the paper's numbers
    config.batch_size = sgd.batch_size
    config.learning_rate = sgd.learning_rate
    config.momentum = sgd.momentum
    config.nesterov = sgd.nesterov
    config.weight_decay = sgd.weight_decay
    config.lr_milestones = sgd.lr_milestones  # fractions of the run where lr is multiplied by lr_decay
    config.lr_decay = sgd.lr_decay
    config.augment = sgd.augment      # as the teacher: none (SVHN) | crop_flip (CIFAR)

    # loss = (1 - alpha) CE + 2 alpha tau^2 KL_mean + beta AT  (losses.kd_at_loss)
    config.alpha = 0.9
    config.temperature = 4.0
    config.beta = 1000.0

    runtime.add(config, unit='iterations', log_every=100, eval_every=572,  # eval: about N / 100
                checkpoint_every=2000, keep_checkpoints=3)
    return config
