"""The students written by the zero-shot and few-shot jobs, read back from their checkpoints
(by the belief-matching job, and by the few-shot job's ``init_student_from``)."""
import os
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from zskt_jax import checkpoints, common, data, parallel, paths
from zskt_jax.errors import UserError


class StudentNotFoundError(UserError, FileNotFoundError):
    pass


def load_student(run_workdir: str, mesh=None, step: Optional[int] = None, dtype_config=None):
    """The student of a zero-shot or few-shot run: (model, variables, run_config, meta).

    Restores only ``student.params`` and ``student.batch_stats`` of the run's checkpoint (the
    latest, or ``step``), whatever else it holds (generator, optimizer states), onto replicated
    arrays of ``mesh``. ``run_config`` is the run's own config (a ConfigDict): it names the
    student's architecture, the dataset and the teacher; ``meta`` is the checkpoint's record
    (iteration, teacher_path, teacher_checksum, history). The network is built with the
    ``compute_dtype`` of ``dtype_config`` (default: the run's own).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    directory = os.path.join(paths.absolute(run_workdir), 'checkpoints')
    if not epath.Path(directory).is_dir():
        raise StudentNotFoundError(
            f'No checkpoints under {directory}: --config.student_workdir (or init_student_from) '
            'must be the --workdir of a zero-shot or few-shot run, e.g. runs/digits after '
            '`python run.py --config=configs/digits.py`.')
    # A large max_to_keep: opening the manager must never delete anything of the run.
    run_checkpoints = checkpoints.RunCheckpoints(directory, keep=10**6, async_save=False)
    try:
        step = run_checkpoints.latest_step() if step is None or step < 0 else step
        if step is None:
            raise StudentNotFoundError(f'{directory} holds no finished checkpoint yet.')
        meta = run_checkpoints.restore_meta(step)
        run_config = ml_collections.ConfigDict(meta['config'])
        if 'student' not in run_config:
            raise StudentNotFoundError(
                f"The run at {run_workdir} is a {run_config.get('job')!r} run, not a zero-shot or "
                'few-shot run: it has no student.')
        info = data.dataset_info(run_config.dataset)
        model = common.build_network(run_config.student, info.num_classes,
                                     run_config if dtype_config is None else dtype_config)
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                   jnp.zeros((1,) + info.image_shape)))
        sharding = parallel.replicated(mesh)
        target = {'student': {
            'params': jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                  sharding=sharding),
                                   shapes['params']),
            'batch_stats': jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                       sharding=sharding),
                                        shapes.get('batch_stats', {}))}}
        restored = run_checkpoints.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))).state['student']
    finally:
        run_checkpoints.close()
    meta = dict(meta, step=step, workdir=paths.absolute(run_workdir))
    return model, {'params': restored['params'], 'batch_stats': restored['batch_stats']}, \
        run_config, meta
