"""A GCS emulator on loopback for tests/test_gcs.py, in a process of its own.

``gcp-storage-emulator`` serves the JSON API (emulator.py patches what it lacks). TensorStore (so
Orbax's arrays) is pointed at it by ``TENSORSTORE_GCS_HTTP_URL``, google-cloud-storage (Orbax's
bucket checks) by ``STORAGE_EMULATOR_HOST``; TensorFlow's gs:// file system (so epath,
TensorBoard and TFDS) has its endpoints hard-coded and no setting for another, so it reaches the
emulator through an HTTPS proxy (tls_proxy.py) that answers for www.googleapis.com with a
throwaway certificate and forwards to the emulator. The server runs in another process because
TensorFlow blocks inside some requests while holding the GIL: a server thread in the test's own
process could never answer them.

    with server.running('bucket') as env:  # this process's environment points at it too
        subprocess.run(..., env=dict(os.environ, **env))
"""
import contextlib
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def environment(info) -> dict:
    """What points TensorStore and TensorFlow's gs:// at the emulator, without credentials."""
    url, proxy = info['emulator_url'], info['proxy_url']
    return {
        'TENSORSTORE_GCS_HTTP_URL': url,                   # TensorStore's gcs kvstore (Orbax)
        'STORAGE_EMULATOR_HOST': url,                      # google-cloud-storage (Orbax)
        'https_proxy': proxy, 'HTTPS_PROXY': proxy,         # TensorFlow's libcurl ...
        'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost',
        'CURL_CA_BUNDLE': info['ca_bundle'],                # ... trusting the proxy's certificate
        'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'fake-token',      # a fixed token: no credentials needed
        'NO_GCE_CHECK': 'true',                             # no metadata-server probe
    }


@contextlib.contextmanager
def running(bucket: str):
    """Start the emulator with ``bucket``; set (and afterwards restore) this process's
    environment; yield it. Raises RuntimeError if the server does not start."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, 'server.py'), bucket],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f'the GCS emulator did not start: {proc.stderr.read()[-2000:]}')
        env = environment(json.loads(line))
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        proc.stdin.close()  # the server exits when its stdin closes
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _main():
    import logging
    logging.disable(logging.CRITICAL)  # the emulator logs every 404 TensorFlow probes for
    sys.path.insert(0, HERE)
    import emulator
    import tls_proxy
    emulator_server, url = emulator.start(bucket=sys.argv[1])
    proxy_server, proxy_url, ca_bundle = tls_proxy.start(url)
    print(json.dumps({'emulator_url': url, 'proxy_url': proxy_url, 'ca_bundle': ca_bundle}),
          flush=True)
    sys.stdin.read()  # until the test closes it
    proxy_server.shutdown()
    emulator_server.stop()


if __name__ == '__main__':
    _main()
