"""Zero-shot distillation on SVHN, the paper's setting (docs/method.md): WRN-40-2 -> WRN-16-1,
N = 50,000 iterations, evaluated on the 26,032 test images every N/100 iterations.

Every pair of the paper is an override away:
  python run.py --config=configs/svhn.py --config.teacher.arch=WRN-40-1 \\
      --config.student.arch=WRN-16-2
The teacher is read from runs/teacher_svhn_{teacher.arch}/teacher: train it with
configs/teacher_svhn.py or import the authors' one with `python -m zskt_jax.import_torch`
(docs/reproducing.md).
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'svhn'
    config.teacher.arch = 'WRN-40-2'
    config.student.arch = 'WRN-16-1'
    config.num_iterations = 50_000
    # N / 100, and it stays so when --config.num_iterations is overridden (a FieldReference).
    config.eval_every_iterations = config.get_ref('num_iterations') // 100
    return config
