"""The embedded offline default: zero-shot distillation on scikit-learn's digits, CPU minutes.

Sizes are scaled down from the paper (each is a field) and the digits are served at 16x16
('digits16': each 8x8 scan pixel a 2x2 block; the 32x32 copy is --config.dataset=digits), so
that the teacher and the student train in under 5 minutes on a 2-core CPU. The paper's loop
alone stalls on some seeds here (a class never learned); this default adds the smallest set of
the later methods' stabilisers with which every seed 0-4 reached 97% of the teacher
(docs/robustness.md): BatchNorm-statistics matching (at twice DFQ's weight), class balance and
the one-hot term on the generator, and a replay memory of past generated images on the student's
side, shifted at random as CMI reads its pool (student_augment = 'crop').
configs/digits_paper.py is the same run with the paper's loop alone.
If no teacher exists yet, ``teacher.recipe`` is run first.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'digits16'
    config.teacher.arch = 'WRN-16-1'
    config.teacher.base_width = 8
    config.teacher.recipe = 'configs/teacher_digits.py'  # trains the teacher when missing
    # The student has the teacher's architecture: WRN-10-1 students stalled near 90%
    # (docs/robustness.md).
    config.student.arch = 'WRN-16-1'
    config.student.base_width = 8
    config.generator.hidden = 32
    config.num_iterations = 500
    config.batch_size = 128
    # n_s = 4: 18% less time an iteration than 5 (the student's updates are ~80% of it) and every
    # seed 0-4 at 97% of two teachers (98.89%, 99.17%; docs/robustness.md). n_s = 3 missed on
    # seeds 1, 2.
    config.n_s = 4
    # Stabilisers (docs/method.md, section "Stabilisers"; weights in this project's loss scale,
    # whose KL is averaged over batch x classes: 1/10 of the per-sample KL the later methods weigh).
    # DeepInversion / DFQ: the teacher's BN input statistics, at twice DFQ's 0.1 (the robust
    # preset's): seeds 0-4 gained 0 to 5 images on oneDNN's path (docs/robustness.md).
    config.bn_weight = 0.2
    config.balance_weight = 2.0       # DAFL: every class keeps being generated
    config.one_hot_weight = 0.1       # DAFL / DFQ: confident teacher predictions
    config.replay_size = 8192         # CMI's image pool: the last 64 batches (25 MB) ...
    config.replay_batch = 128         # ... as many replayed images as new ones per student batch
    config.student_augment = 'crop'   # CMI: the student's images shifted by up to 2 pixels
    # oneDNN's convolutions on CPU (zskt_jax/onednn.py): the student's job in 146 instead of
    # 182 s on a 2-core Xeon; the same function as XLA's up to rounding. Where it cannot be built
    # (no g++, not x86-64 Linux) and on GPU/TPU the run falls back to XLA's convolutions, and on
    # XLA:CPU the kernel gradients over slices of 64 of the 256-image student batch (0.40 instead
    # of 0.53 s an iteration at n_s = 5 on the 2-core AMD EPYC; unused under oneDNN).
    config.convolution = 'onednn'
    config.weight_grad_chunk = 64
    config.eval_every_iterations = 50
    config.eval_batch_size = 360
    config.log_every_iterations = 25
    config.checkpoint_every_iterations = 100
    return config
