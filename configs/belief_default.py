"""Transition curves and Mean Transition Error (docs/method.md, section "Belief matching"): a
run's student (network A, attacked) against its teacher (network B).

    python run.py --config=configs/belief_default.py --config.student_workdir=runs/svhn \
        --workdir=runs/belief_svhn
"""
import ml_collections


def get_config():
    config = ml_collections.ConfigDict()
    config.job = 'belief'
    config.seed = 0                   # the shuffled order in which agreeing test images are taken
    config.student_workdir = ''       # workdir of a zero-shot or few-shot run (required)
    config.student_step = -1          # its checkpoint; -1 = the latest
    config.teacher_checkpoint = ''    # network B; '' = the teacher the student's run recorded
    config.data_dir = ''              # TFDS data dir; '' = the student run's
    config.num_images = 1000          # agreeing test images attacked; -1 = every agreeing image
    config.num_steps = 100            # K steps recorded per (image, target) (released code: 200)
    config.mte_steps = 100            # the MTE averages the first mte_steps steps
    config.step_size = 1.0            # xi: x <- x - xi * grad_x CE(A(x), j), normalised inputs
    config.batch_size = 900           # image-target pairs attacked per compiled call (all devices)
    config.eval_batch_size = 500      # batch for the agreement/accuracy pass over the test split
    config.plot_steps = 30            # the figure shows steps 0..plot_steps (paper's Figure 4)
    config.attack_loop = 'auto'       # the K steps as: scan | steps (a jitted step K times) | auto
                                      # (steps on CPU, where XLA is slow inside loops; scan elsewhere)
    config.log_every_chunks = 10             # chunks between progress lines
    config.compute_dtype = 'float32'
    return config
