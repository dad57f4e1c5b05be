"""What a user watches: progress lines, TensorBoard events, image grids and results.json.

TensorBoard events are written by clu's metric writers. Only process 0 writes anything
(``active=False`` elsewhere).
"""
import json
import logging
import math
import os
import time
from typing import Dict, Optional

import numpy as np

from zskt_jax import paths

logger = logging.getLogger('zskt_jax')


def metric_writer(logdir: str, active: bool = True):
    """clu's TensorBoard writer for ``logdir`` (TensorFlow summaries, written through
    tf.io.gfile: gs:// too), asynchronous so that the training loop does not wait for the event
    file. ``active=False`` (every process but 0): a writer that writes nothing.

    clu's writers import TensorFlow. Without it (a GPU image with JAX alone) the events are
    written by PyTorch's TensorBoard writer where torch is installed (local paths), else only
    the progress lines and results.json report the run."""
    from zskt_jax import data
    if not data.tensorflow_installed():
        return _TorchOrNoWriter(logdir if active else None)
    from clu import metric_writers
    if not active:
        return metric_writers.MultiWriter([])
    return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


class _TorchOrNoWriter:
    """The part of clu's MetricWriter interface the jobs use, without TensorFlow."""

    def __init__(self, logdir: Optional[str]):
        self._writer = None
        if logdir is None:
            return
        try:
            from torch.utils import tensorboard
        except ImportError:
            logger.warning('Neither TensorFlow nor torch is installed: no TensorBoard events '
                           'are written (progress lines and results.json still are).')
            return
        self._writer = tensorboard.SummaryWriter(logdir)

    def write_scalars(self, step: int, scalars: Dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, float(value), global_step=step)

    def write_images(self, step: int, images: Dict[str, np.ndarray]) -> None:
        if self._writer is not None:
            for name, batch in images.items():  # [N, H, W, C] uint8, as clu takes them
                self._writer.add_images(name, np.asarray(batch), global_step=step,
                                        dataformats='NHWC')

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def image_grid(images: np.ndarray, mean, std, columns: int = 8) -> np.ndarray:
    """Normalised images [N, H, W, C] -> one uint8 grid [rows*H, columns*W, 3], de-normalised
    with the dataset's mean/std and clipped to [0, 1]."""
    images = np.clip(np.asarray(images, np.float32) * np.asarray(std) + np.asarray(mean), 0, 1)
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    grid = np.zeros((rows * h, columns * w, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    if c == 1:
        grid = np.repeat(grid, 3, axis=-1)
    return (grid * 255).round().astype(np.uint8)


class Progress:
    """Units per second (since the last report) and ETA, for one line per report.

    Counted in steps; shown in units of ``steps_per_unit`` steps. Without a ``unit`` name the
    unit is the iteration: ``[5/500] 2.44 it/s, ETA ...``; with one (the teacher's 'epoch'):
    ``epoch 5/30, 2.44 epochs/s, ETA ...``, or ``41.0 s/epoch`` below one a second.
    """

    def __init__(self, start_step: int, total_steps: int, steps_per_unit: int = 1,
                 unit: str = ''):
        self.total = total_steps
        self.per = steps_per_unit
        self.unit = unit
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Count rates from here (after the first step, so that its compilation is left out)."""
        self._last_step, self._last_time = step, time.perf_counter()

    def line(self, step: int, metrics: Dict[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        eta = (self.total - step) / rate if rate > 0 else float('inf')
        shown = ' '.join(f'{k}={v:.4g}' for k, v in metrics.items())
        units = rate / self.per
        if not self.unit:
            where, speed = f'[{step // self.per}/{self.total // self.per}]', f'{units:.2f} it/s'
        else:
            where = f'{self.unit} {step // self.per}/{self.total // self.per},'
            speed = (f'{units:.2f} {self.unit}s/s' if units >= 1 or units <= 0
                     else f'{1 / units:.1f} s/{self.unit}')
        return f'{where} {speed}, ETA {format_seconds(eta)} | {shown}'


class RunClock:
    """Wall-clock seconds a run has spent, summed over the processes that ran it.

    Time to accuracy stays monotone across a resume: ``resume(meta)`` continues from the time
    the checkpoint recorded (its ``wall_time_s``, else its last evaluation's), so the time the
    run spent stopped is not counted but the work before the stop is.
    """

    def __init__(self):
        self._start = time.time()
        self._offset = 0.0

    def resume(self, meta: Dict) -> None:
        history = meta.get('history') or [{}]
        self._offset = float(meta.get('wall_time_s', history[-1].get('wall_time_s', 0.0)))

    def __call__(self) -> float:
        return self._offset + time.time() - self._start


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return '?'
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def finish_results(workdir: str, results: Dict, *, wall_time_s: float, config: Dict,
                   active: bool = True, **fields) -> Optional[str]:
    """Every job's results writer: ``results`` with the fields every job reports added (its
    wall time, the job's own ``fields`` such as its history, the devices, the backend, the
    convolutions and kernel-gradient slices that ran (the config's CPU levers as resolved on
    this machine) and the config), written as ``{workdir}/results.json`` (``write_results``).
    Returns the path, None where ``active`` is False (every process but 0)."""
    import jax

    from zskt_jax import common
    results.update(wall_time_s=wall_time_s, **fields, devices=jax.device_count(),
                   backend=jax.default_backend(), convolution=common.convolution(config),
                   weight_grad_chunk=common.weight_grad_chunk(config), config=config)
    return write_results(workdir, results, active=active)


def write_results(workdir: str, results: Dict, active: bool = True) -> Optional[str]:
    """Write ``results.json`` atomically (a partial file is never left behind)."""
    if not active:
        return None
    path = os.path.join(workdir, 'results.json')
    paths.write_text(path, json.dumps(results, indent=2, sort_keys=True, default=_jsonable))
    return path


def _jsonable(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
