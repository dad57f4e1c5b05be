"""Several processes: two processes with 4 CPU devices each compute what one process with 8 does.

Each process is a child started with ``--xla_force_host_platform_device_count=4`` that joins the
other through ``jax.distributed.initialize`` on localhost (CPU collectives over gloo). A tiny
digits distillation runs through ``run.py`` from nothing (its teacher recipe first: process 0
writes the teacher, the other waits for it; both save the Orbax checkpoints) and must end where
the same run on one 8-device process ends. A SIGTERM to one process stops both at one iteration.
A lighter worker (this file as a script,
two processes again, no TensorFlow) restores that run's checkpoint as a resumed run does, and
checks the host-sharded evaluation over shares of unequal size and the feeding of host-local
batches. Stuck children are killed with SIGKILL: the distributed runtime catches SIGTERM.
"""
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from test_parallel import METRICS_RTOL, ROOT, assert_states_close, eval_split, subprocess_env
from tiny_config import write_config_file

TIMEOUT_S = 300
EVAL_EXAMPLES = 313    # shares of 157 and 156: 4 and 3 batches of 52 per process
EVAL_BATCH = 100       # 52 per process (4 devices x 13), 104 in all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def launch(args, num_processes: int, devices_per_process: int, log_prefix: str,
           sigterm_when=None):
    """Start ``num_processes`` children (with the distributed flags when more than one), wait
    for all, SIGKILL them all if any fails or the time runs out; returns their outputs.

    ``sigterm_when=(text, i)``: send SIGTERM to process i once process 0's output shows text."""
    port = free_port()
    # Each process compiles (sharing the persistent cache). JAX_SHARE_BINARY_BETWEEN_HOSTS
    # (process 0 compiles for both) made the first cross-process collective fail on CPU here.
    env = subprocess_env(devices_per_process)
    procs, logs = [], []
    for i in range(num_processes):
        extra = ([f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={num_processes}',
                  f'--process_id={i}'] if num_processes > 1 else [])
        logs.append(open(f'{log_prefix}.{i}.log', 'w+'))
        procs.append(subprocess.Popen([sys.executable, *args, *extra], cwd=ROOT, env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT, text=True))
    deadline = time.time() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if sigterm_when and sigterm_when[0] in open(logs[0].name).read():
                procs[sigterm_when[1]].send_signal(signal.SIGTERM)
                sigterm_when = None
            # A process that failed then waits for the others at the distributed runtime's
            # shutdown barrier (minutes): stop all as soon as one fails.
            if (time.time() > deadline or any(p.poll() not in (None, 0) for p in procs)
                    or any(_failed(log.name) for log in logs)):
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # SIGKILL
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (
            f'process {i} of {num_processes}: rc {p.returncode} (-9: killed after another '
            f'process failed or after {TIMEOUT_S} s)\n'
            + '\n'.join(f'--- process {j}:\n{out[-4000:]}' for j, out in enumerate(outputs)))
    return procs, outputs


def _failed(log_path: str) -> bool:
    with open(log_path) as f:
        return 'Traceback (most recent call last)' in f.read()


def final_checkpoint(workdir: str):
    """The newest checkpoint's arrays, restored on this process's one device whatever the
    topology that wrote them (the 2-process run's devices are not this process's)."""
    import jax
    import orbax.checkpoint as ocp
    directory = os.path.join(workdir, 'checkpoints')
    step = max(int(d) for d in os.listdir(directory) if d.isdigit())
    path = os.path.join(directory, str(step), 'state')
    checkpointer = ocp.StandardCheckpointer()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          checkpointer.metadata(path).item_metadata)
    return step, checkpointer.restore(path, target)


def assert_final_states_close(workdir_a: str, workdir_b: str):
    """Both runs' last checkpoints are of iteration 3 and agree to float32 rounding as amplified
    by 3 iterations (parameters, batch statistics, optimizer states; tolerances and why:
    test_parallel.assert_states_close), but for Adam's moments at 5e-2: moments of gradients
    that BatchNorms nearly cancel (norms 2e-5 to 5e-5: the generator's bn0 bias, a student BN
    scale) end 1.1e-2 to 2.9e-2 of their norm apart on a 2-core Intel Xeon Processor (family 6,
    model 167), changing from run to run with gloo's summation order (2026-12-04). A wrong
    gradient is O(1) there; the parameters keep 1e-3."""
    import jax
    (step_a, state_a), (step_b, state_b) = final_checkpoint(workdir_a), final_checkpoint(workdir_b)
    assert step_a == step_b == 3
    paths = jax.tree_util.tree_flatten_with_path(state_a)[0]
    leaves = jax.tree.leaves(state_b)
    assert len(paths) == len(leaves) > 0
    assert_states_close([(jax.tree_util.keystr(path), np.asarray(a), np.asarray(b))
                         for (path, a), b in zip(paths, leaves)], moment_rtol=5e-2)


@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits_data_dir, tiny_teacher):
    root = tmp_path_factory.mktemp('multihost')
    # Adam's eps of 1e-8 turns float32 rounding noise in near-zero gradients into large parts of
    # a step (tests/test_parallel.py, test_three_iterations_on_8_devices_equal_1_device), and
    # gloo sums in another order than one process does; with 1e-3 the runs agree to ~1e-6.
    # From nothing: no teacher yet, a recipe that trains one for an epoch (22 steps of 64).
    recipe = root / 'tiny_teacher_recipe.py'
    recipe.write_text(TEACHER_RECIPE.format(root=ROOT))
    # beta = 0: the attention term (per-sample normalised maps) amplifies rounding most
    # (test_parallel.assert_states_close), and gloo's sums change order from run to run. With
    # it, on a 2-core Intel Xeon Processor (family 6, model 167), three runs of this module put
    # the 2-process run's states 1.1e-2 and 2.1e-2 (Adam moments) and 5.8e-3 (a BatchNorm bias)
    # from the 1-process run's, at this commit and at the one before (2026-12-04).
    config_path = write_config_file(root / 'tiny.py', digits_data_dir, tiny_teacher,
                                    adam_eps=1e-3, beta=0.0, **{'teacher.recipe': str(recipe)})
    # The 2-process run goes first and trains the teacher; the 1-process run distils the same
    # teacher (its own, trained in another summation order, would differ by ~1e-4 after 22
    # SGD steps, and so would everything after it).
    teacher = str(root / 'teacher' / 'teacher')
    run_py = [os.path.join(ROOT, 'run.py'), f'--config={config_path}',
              f'--config.teacher.checkpoint={teacher}']
    single, double = str(root / 'single'), str(root / 'double')
    procs, outputs = launch([*run_py, f'--workdir={double}'], 2, 4, str(root / 'double'))
    _, single_outputs = launch([*run_py, f'--workdir={single}'], 1, 8, str(root / 'single'))
    return {'single': single, 'double': double, 'config': str(config_path), 'outputs': outputs,
            'pids': [p.pid for p in procs], 'teacher': teacher, 'single_outputs': single_outputs}


TEACHER_RECIPE = '''import sys
sys.path.insert(0, {root!r})
from configs import teacher_digits


def get_config():
    config = teacher_digits.get_config()  # dataset and networks: the distillation's (launch.py)
    config.epochs = 1
    return config
'''


def test_the_teacher_recipe_runs_first_and_is_written_once(runs):
    """From nothing on 2 processes: the recipe trains the teacher (one program over both
    processes' 8 devices), process 0 reports it and writes its record, both read it back and
    distil it; the 1-process run then finds it and trains none."""
    assert 'No teacher at' in runs['outputs'][0] and 'Teacher written to' in runs['outputs'][0]
    assert 'No teacher at' not in runs['outputs'][1]
    assert 'No teacher at' not in runs['single_outputs'][0]
    teacher = json.loads(open(os.path.join(runs['teacher'], 'teacher.json')).read())
    assert teacher['arch'] == 'WRN-10-1' and teacher['source'] == 'trained'
    results = json.loads(open(os.path.join(runs['double'], 'results.json')).read())
    assert results['teacher_accuracy'] == teacher['test_accuracy']
    assert results['teacher_path'] == runs['teacher']


def test_two_processes_end_where_one_8_device_process_ends(runs):
    single = json.loads(open(os.path.join(runs['single'], 'results.json')).read())
    double = json.loads(open(os.path.join(runs['double'], 'results.json')).read())
    assert double['devices'] == single['devices'] == 8
    assert double['student_accuracy'] == single['student_accuracy']
    assert double['teacher_accuracy'] == single['teacher_accuracy']
    assert ([(h['iteration'], h['student_accuracy']) for h in double['history']] ==
            [(h['iteration'], h['student_accuracy']) for h in single['history']])
    assert [h['iteration'] for h in double['history']] == [2, 3]
    for name, value in single['final_train_metrics'].items():
        assert double['final_train_metrics'][name] == pytest.approx(
            value, rel=METRICS_RTOL, abs=1e-7), name

    # Float32 rounding: the all-reduces of gloo and of one process sum in different orders.
    assert_final_states_close(runs['single'], runs['double'])


def test_resume_on_one_device_from_an_8_device_checkpoint(runs, tmp_path):
    """Checkpoints restore onto any mesh: the 8-device run's iteration-2 checkpoint, resumed by a
    1-device process, ends where the 8-device run ends (float32 rounding apart)."""
    workdir = tmp_path / 'resumed'
    shutil.copytree(os.path.join(runs['single'], 'checkpoints'), workdir / 'checkpoints')
    shutil.rmtree(workdir / 'checkpoints' / '3')  # as if stopped after iteration 2
    _, outputs = launch([os.path.join(ROOT, 'run.py'), f'--config={runs["config"]}',
                         f'--workdir={workdir}',
                         f"--config.teacher.checkpoint={runs['teacher']}"],
                        1, 1, str(tmp_path / 'resumed'))
    assert 'Resumed from' in outputs[0] and '[3/3]' in outputs[0], outputs[0][-3000:]
    single = json.loads(open(os.path.join(runs['single'], 'results.json')).read())
    resumed = json.loads((workdir / 'results.json').read_text())
    assert (single['devices'], resumed['devices']) == (8, 1)
    # The history up to iteration 2 comes from the checkpoint, then one more evaluation.
    assert [h['iteration'] for h in resumed['history']] == [2, 3]
    assert resumed['history'][0] == single['history'][0]
    assert resumed['student_accuracy'] == pytest.approx(single['student_accuracy'], abs=0.01)
    for name, value in single['final_train_metrics'].items():
        assert resumed['final_train_metrics'][name] == pytest.approx(
            value, rel=METRICS_RTOL, abs=1e-6), name

    # Iteration 3 sums over 1 device instead of 8 (test_parallel.py explains the tolerance).
    assert_final_states_close(runs['single'], str(workdir))


def test_sigterm_to_one_process_stops_both_at_the_same_iteration(runs, tmp_path):
    """JAX's preemption service: process 1 alone gets SIGTERM; both processes stop after the
    same iteration (the one they agree on), checkpoint it together and exit cleanly."""
    workdir = tmp_path / 'preempted'
    _, outputs = launch([os.path.join(ROOT, 'run.py'), f'--config={runs["config"]}',
                         f'--workdir={workdir}',
                         f"--config.teacher.checkpoint={runs['teacher']}",
                         '--config.num_iterations=100000', '--config.log_every_iterations=1',
                         '--config.eval_every_iterations=0',
                         '--config.checkpoint_every_iterations=100000'],
                        2, 4, str(tmp_path / 'preempted'), sigterm_when=('[3/100000]', 1))
    saved = sorted(os.listdir(workdir / 'checkpoints'))
    assert len(saved) == 1 and int(saved[0]) >= 3, saved
    assert f'Stopped after iteration {saved[0]}' in outputs[0], outputs[0][-2000:]
    assert 'results.json' not in os.listdir(workdir)


def test_only_process_0_writes_and_logs(runs):
    out = runs['outputs']
    assert 'it/s' in out[0] and 'student test accuracy' in out[0]
    assert 'student_accuracy=' in out[0]
    # Process 1 trains and evaluates without a word (it logs warnings and errors only).
    assert 'it/s' not in out[1] and 'accuracy' not in out[1], out[1][-2000:]
    double = runs['double']
    assert sorted(os.listdir(double)) == ['checkpoints', 'results.json', 'tensorboard']
    assert sorted(os.listdir(os.path.join(double, 'checkpoints'))) == ['2', '3']
    # One events file, written by process 0 (the file name holds the writer's pid).
    events = glob.glob(os.path.join(double, 'tensorboard', 'events.out.tfevents.*'))
    assert len(events) == 1 and f".{runs['pids'][0]}." in os.path.basename(events[0]), events


# ---------------------------------------------------------------------------------------------
# Restoring, host-sharded evaluation and host-local batches, in a lighter worker.

def belief_outputs(mesh):
    """The belief job's transition curves (27 pairs in chunks of 16, the last one padded) and
    predictions for tests/test_belief.py's case, computed on ``mesh`` and gathered whole."""
    from zskt_jax import belief
    from test_belief import STEPS, belief_case
    (model_a, variables_a), (model_b, variables_b), images, targets = belief_case()
    attack = belief.make_attack_fn(model_a, model_b, 'digits', STEPS, 1.0, mesh, loop='steps')
    p_a, p_b = belief.transition_curves(attack, variables_a, variables_b, images, targets, 16,
                                        mesh)
    predictions = belief.predict(belief.make_predict_fn(model_a, 'digits', mesh), variables_a,
                                 images, 8, mesh)
    return p_a, p_b, predictions


def worker(out_dir: str, config_path: str, workdir: str):
    """One of two processes, started by run.py's start-up code from the same flags."""
    sys.path.insert(0, ROOT)
    from absl import flags
    import run  # noqa: F401  (defines run.py's flags)
    from zskt_jax import launch
    flags.FLAGS([sys.argv[0]] + [a for a in sys.argv[1:] if a.startswith('--')])
    launch.start_distributed(launch.distributed_settings(flags.FLAGS.coordinator_address,
                                                   flags.FLAGS.num_processes,
                                                   flags.FLAGS.process_id))
    import jax
    import orbax.checkpoint as ocp
    from jax.experimental import multihost_utils
    from zskt_jax import checkpoints, common, data, parallel, zero_shot
    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    mesh = parallel.make_mesh()
    result = {'process': jax.process_index()}

    # Resuming: both processes restore the 2-process run's latest checkpoint, onto replicated
    # arrays of this mesh, through the job's own restore_latest (config checks included).
    config = launch.load_config_file(config_path)
    run_checkpoints = checkpoints.RunCheckpoints(os.path.join(workdir, 'checkpoints'), keep=3)
    metadata = ocp.StandardCheckpointer().metadata(
        os.path.join(run_checkpoints.directory, '3', 'state')).item_metadata
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                                         sharding=parallel.replicated(mesh)),
                          metadata)
    step, state, meta = checkpoints.restore_latest(run_checkpoints, target, config.to_dict())
    run_checkpoints.close()
    result['restored_step'], result['restored_iteration'] = step, meta['iteration']
    result['restored_replicated'] = all(leaf.sharding.is_fully_replicated and
                                        len(leaf.sharding.device_set) == 8
                                        for leaf in jax.tree.leaves(state))
    np.savez(os.path.join(out_dir, f'restored{jax.process_index()}.npz'),
             *[np.asarray(leaf) for leaf in jax.tree.leaves(state)])

    # Evaluation: this process's share only, combined exactly.
    model, variables, images, labels, predictions = eval_split(EVAL_EXAMPLES)
    share = data.shard_indices(EVAL_EXAMPLES, jax.process_index(), jax.process_count())
    evaluator = common.Evaluator(model, 'digits', images[share], labels[share], EVAL_BATCH, mesh)
    result['share'] = share.stop - share.start
    result['local_batches'] = -(-result['share'] // 52)
    result['batches'] = evaluator.num_batches
    counts = evaluator.counts(parallel.replicate(variables, mesh))
    result['accuracy'] = counts.accuracy
    result['predicted'] = counts.predicted.tolist()
    result['numpy_predicted'] = np.bincount(predictions, minlength=10).tolist()
    one_device = parallel.make_mesh(jax.local_devices()[:1])
    result['one_device_accuracy'] = common.Evaluator(
        model, 'digits', images, labels, EVAL_BATCH, one_device)(
            parallel.replicate(variables, one_device))
    result['numpy_accuracy'] = int(np.sum(predictions == labels)) / EVAL_EXAMPLES

    # Training batches (teacher and few-shot jobs): each process feeds its rows of the global
    # batch that every process draws.
    global_images = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = parallel.shard_batch(global_images, mesh)
    result['rows'] = parallel.process_rows(16, mesh).tolist()
    result['batch_sharding_ok'] = batch.sharding == parallel.batch_sharded(mesh)
    result['batch_equal'] = bool(np.array_equal(
        multihost_utils.process_allgather(batch, tiled=True), global_images))

    # The belief job: predictions and transition curves over both processes' devices, gathered
    # whole on each (27 pairs in chunks of 16, the last one padded).
    p_a, p_b, predictions = belief_outputs(mesh)
    np.savez(os.path.join(out_dir, f'belief{jax.process_index()}.npz'), p_a=p_a, p_b=p_b,
             predictions=predictions)
    key = parallel.replicate(jax.random.key(7), mesh)  # typed keys have no NumPy form
    result['key_equal'] = bool(np.array_equal(jax.random.key_data(key),
                                              jax.random.key_data(jax.random.key(7))))
    with open(os.path.join(out_dir, f'worker{jax.process_index()}.json'), 'w') as f:
        json.dump(result, f)


def test_restore_evaluation_and_batches_on_two_processes(runs, tmp_path):
    launch([os.path.abspath(__file__), str(tmp_path), runs['config'], runs['double']], 2, 4,
           str(tmp_path / 'worker'))
    results = [json.loads((tmp_path / f'worker{i}.json').read_text()) for i in range(2)]

    # Orbax in multi-process mode: both processes restored the checkpoint both saved.
    import jax
    _, saved = final_checkpoint(runs['double'])
    saved = jax.tree.leaves(saved)
    for i, r in enumerate(results):
        assert r['restored_step'] == r['restored_iteration'] == 3 and r['restored_replicated']
        with np.load(tmp_path / f'restored{i}.npz') as restored:
            assert len(restored.files) == len(saved)
            for k, leaf in enumerate(saved):
                np.testing.assert_array_equal(restored[f'arr_{k}'], np.asarray(leaf))

    assert [r['share'] for r in results] == [157, 156]
    # The shares need 4 and 3 batches of 52; both processes run 4 (collectives need both).
    assert [r['local_batches'] for r in results] == [4, 3]
    assert [r['batches'] for r in results] == [4, 4]
    for r in results:
        # Exact: integer counts summed over 8 devices and 2 hosts, padding masked out.
        assert r['accuracy'] == r['one_device_accuracy'] == r['numpy_accuracy']
        assert r['predicted'] == r['numpy_predicted']  # per-class counts over both processes
        assert 0.3 < r['accuracy'] < 0.8
        assert r['batch_sharding_ok'] and r['batch_equal'] and r['key_equal']
    assert results[0]['rows'] == list(range(8)) and results[1]['rows'] == list(range(8, 16))

    # The belief job's curves and predictions, as one device computes them.
    from zskt_jax import parallel
    p_a, p_b, predictions = belief_outputs(parallel.make_mesh(jax.devices()[:1]))
    for i in range(2):
        with np.load(tmp_path / f'belief{i}.npz') as gathered:
            np.testing.assert_allclose(gathered['p_a'], p_a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(gathered['p_b'], p_b, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(gathered['predictions'], predictions)


# ---------------------------------------------------------------------------------------------
# run.py's start-up decisions (no processes).

def test_distributed_settings_from_flags_environment_and_tpu():
    sys.path.insert(0, ROOT)
    from zskt_jax import launch
    settings = launch.distributed_settings
    assert settings(environ={}, on_tpu_vm=False) is None
    assert settings(environ={}, on_tpu_vm=True) == {}  # JAX reads a TPU VM's topology itself
    assert settings('10.0.0.1:1234', 2, 1, environ={}, on_tpu_vm=False) == {
        'coordinator_address': '10.0.0.1:1234', 'num_processes': 2, 'process_id': 1}
    environ = {'ZSKT_COORDINATOR_ADDRESS': 'host:5', 'ZSKT_NUM_PROCESSES': '4',
               'ZSKT_PROCESS_ID': '3'}
    assert settings(environ=environ, on_tpu_vm=False) == {
        'coordinator_address': 'host:5', 'num_processes': 4, 'process_id': 3}
    assert settings(process_id=0, environ=environ, on_tpu_vm=False)['process_id'] == 0  # flag wins
    assert settings(mode='off', environ=environ, on_tpu_vm=True) is None
    assert settings(environ={'ZSKT_DISTRIBUTED': 'off'}, on_tpu_vm=True) is None
    assert settings(mode='on', environ={}, on_tpu_vm=False) == {}  # JAX detects the cluster
    with pytest.raises(ValueError, match='ZSKT_NUM_PROCESSES'):
        settings(environ={'ZSKT_NUM_PROCESSES': 'two'}, on_tpu_vm=False)


if __name__ == '__main__':
    worker(*sys.argv[1:4])
