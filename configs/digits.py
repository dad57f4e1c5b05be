"""The embedded offline default: zero-shot distillation on scikit-learn's digits, CPU minutes.

Sizes are scaled down from the paper (each is a field; see the README for what was measured).
If no teacher exists yet, ``teacher.recipe`` is run first.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'digits'
    config.teacher.arch = 'WRN-16-1'
    config.teacher.base_width = 8
    config.teacher.recipe = 'configs/teacher_digits.py'  # trains the teacher when missing
    # The student has the teacher's architecture: WRN-10-1 students stalled near 90% (README).
    config.student.arch = 'WRN-16-1'
    config.student.base_width = 8
    config.generator.hidden = 32
    config.num_iterations = 500
    config.batch_size = 128
    config.n_s = 5
    config.eval_every = 50
    config.eval_batch_size = 360
    config.log_every = 25
    config.checkpoint_every = 100
    return config
