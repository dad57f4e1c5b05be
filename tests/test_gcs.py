"""gs:// for real, against a GCS emulator on loopback (tests/gcs/server.py): a tiny zero-shot
run with its workdir and its teacher in a bucket, stopped by SIGTERM, resumed to the end, and
everything it wrote read back from the bucket. Skipped, with the reason, only if the emulator
cannot start."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, read_events, write_teacher
from test_parallel import subprocess_env
from tiny_config import write_config_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gcs'))

BUCKET = 'zskt-test'
ITERATIONS = 60


@pytest.fixture(scope='module')
def bucket():
    try:
        import server
        context = server.running(BUCKET)
        env = context.__enter__()
    except Exception as error:  # noqa: BLE001 - any reason the emulator is not there
        # pytest.ini's -rs prints the reason in the summary.
        pytest.skip(f'the GCS emulator cannot start ({type(error).__name__}: {error})')
    try:
        yield env
    finally:
        context.__exit__(None, None, None)


def run_py(args, env, sigterm_after=None):
    """run.py in a child process; with ``sigterm_after``, SIGTERM once its output shows it."""
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), *args], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output, deadline = [], time.time() + 300
    for line in process.stdout:
        output.append(line)
        if sigterm_after and sigterm_after in line:
            process.send_signal(signal.SIGTERM)
            sigterm_after = None
        if time.time() > deadline:
            process.kill()
    process.wait()
    return process.returncode, ''.join(output)


def test_a_run_in_a_bucket_stops_resumes_and_reads_back(bucket, tmp_path, digits_data_dir):
    from etils import epath
    from zskt_jax import checkpoints
    teacher = f'gs://{BUCKET}/teachers/tiny'
    write_teacher(teacher)  # through epath and Orbax, into the bucket
    workdir = f'gs://{BUCKET}/run'
    config = write_config_file(tmp_path / 'tiny.py', digits_data_dir, teacher,
                               num_iterations=ITERATIONS, log_every_iterations=1,
                               eval_every_iterations=ITERATIONS // 2,
                               checkpoint_every_iterations=ITERATIONS // 2)
    env = dict(subprocess_env(1), **bucket)
    args = [f'--config={config}', f'--workdir={workdir}']

    code, first = run_py(args, env, sigterm_after=f'[3/{ITERATIONS}]')
    assert code == 0, first[-3000:]
    stopped = int(first.split('Stopped after iteration ')[1].split(';')[0])
    assert 3 <= stopped < ITERATIONS // 2, first[-3000:]
    assert f'checkpoint written to {workdir}/checkpoints/{stopped}' in first
    assert not epath.Path(workdir, 'results.json').exists()

    code, second = run_py(args, env)
    assert code == 0, second[-3000:]
    assert f'Resumed from {workdir}/checkpoints' in second and f'[{ITERATIONS}/' in second

    results = json.loads(epath.Path(workdir, 'results.json').read_text())
    assert results['iterations'] == ITERATIONS and results['teacher_path'] == teacher
    assert [h['iteration'] for h in results['history']] == [ITERATIONS // 2, ITERATIONS]
    run_checkpoints = checkpoints.RunCheckpoints(f'{workdir}/checkpoints', keep=3)
    assert run_checkpoints.manager.all_steps() == [stopped, ITERATIONS // 2, ITERATIONS]
    meta = run_checkpoints.restore_meta(ITERATIONS)
    assert meta['iteration'] == ITERATIONS and meta['teacher_path'] == teacher
    run_checkpoints.close()
    events = read_events(f'{workdir}/tensorboard')  # both runs' event files
    assert [step for step, _ in events['eval/student_accuracy']] == [ITERATIONS // 2, ITERATIONS]
    assert sorted({step for step, _ in events['train/kl']}) == list(range(1, ITERATIONS + 1))
