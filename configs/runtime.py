"""The runtime fields of the training jobs (cadence, checkpoints, precision), defined once for
configs/default.py (zero-shot), few_shot_default.py and teacher_default.py. Each job counts in
its own unit and the unit is in the field's name: iterations for zero-shot and few-shot, epochs
for the teacher's cadence (its stop counts SGD steps, so that a stop mid-epoch resumes exactly).

Which of these may change when a run resumes: zskt_jax/checkpoints.py, MAY_CHANGE_ON_RESUME
(every field not listed there must equal the checkpoint's).
"""


def add(config, *, unit: str, log_every: int, checkpoint_every: int, keep_checkpoints: int,
        eval_every=None, stop_unit: str = ''):
    """Add the runtime fields to ``config`` (a ConfigDict) and return it.

    ``{unit}``: what the cadence counts ('iterations' | 'epochs'); ``eval_every`` None: the job
    has no periodic evaluation; ``stop_unit``: what ``stop_after_*`` counts (default ``unit``).
    """
    # Between progress lines and TensorBoard scalars; between test evaluations (0: only at the
    # end; every job also evaluates at its end); between checkpoints (a SIGTERM / Ctrl-C stop
    # and the end also checkpoint).
    config[f'log_every_{unit}'] = log_every
    if eval_every is not None:
        config[f'eval_every_{unit}'] = eval_every
    config[f'checkpoint_every_{unit}'] = checkpoint_every
    config.eval_batch_size = 500       # evaluation batch (all devices), rounded up to fit them
    config.keep_checkpoints = keep_checkpoints  # the most recent ones kept
    config.resume_fallback = False     # latest checkpoint unreadable: resume from the one before
    # >0: checkpoint and stop after this many iterations / steps of a run (rerun to continue)
    config[f'stop_after_{stop_unit or unit}'] = 0
    config.compute_dtype = 'float32'   # activations: float32 | bfloat16 (params, optimizers,
                                       # losses stay float32)
    config.weight_grad_chunk = 0       # >0: conv kernel gradients summed over slices of this many
                                       # examples (8: ~1.3x faster on XLA:CPU;
                                       # docs/performance.md)
    config.convolution = 'xla'         # 'onednn': oneDNN's convolutions on XLA:CPU, several times
                                       # faster; the same sums in another order. Other backends
                                       # and machines without it keep XLA's (docs/performance.md)
    return config
