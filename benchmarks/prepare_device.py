"""Prepare, on a machine with the project installed and a package index, what a bare GPU machine
needs to run ``benchmarks/gpu_check.py``: wheels of the packages its image lacks, and the digits
built as TFDS array_record data (read there without TensorFlow).

    python benchmarks/prepare_device.py                       # into .device/ (git-ignored)
    python benchmarks/prepare_device.py --out DIR --python_version 3.12

The GPU image this targets (CPython 3.12, x86-64) has jax, flax, optax, orbax-checkpoint, chex,
etils, torch, scikit-learn and tensorboard, but no ml-collections, clu, TFDS (nor what TFDS needs
beyond those) and no TensorFlow, and it reaches no package index. So this script:

1. downloads, for ``--python_version`` on manylinux x86-64, one wheel of each package in
   ``DEVICE_PACKAGES`` at the version installed here (pure-Python packages that publish only a
   source archive are built into a wheel here), into ``OUT/wheels``;
2. builds the digits at both resolutions (``digits/32x32``, ``digits/16x16``) in TFDS's
   array_record format into ``OUT/tensorflow_datasets`` (building needs TensorFlow, which this
   machine has; reading array_record does not).

``gpu_check.py --device_dir OUT`` then installs the wheels with ``pip install --no-index`` (no
network) and points TFDS at the data. Nothing here is needed where TensorFlow is installed.
"""
import argparse
import glob
import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's zskt_jax, whether or not it is installed

# What the GPU image lacks of the project's runtime dependencies, and what those need in turn
# that the image lacks too (read off each wheel's Requires-Dist).
DEVICE_PACKAGES = (
    'ml-collections', 'clu', 'tensorflow-datasets', 'array-record', 'dm-tree', 'promise',
    'simple-parsing', 'docstring-parser', 'tensorflow-metadata', 'googleapis-common-protos',
    'immutabledict', 'toml', 'termcolor', 'importlib-resources',
)
PLATFORMS = ('manylinux_2_17_x86_64', 'manylinux2014_x86_64', 'manylinux_2_27_x86_64',
             'manylinux_2_28_x86_64', 'manylinux_2_31_x86_64', 'manylinux_2_34_x86_64', 'any')
DIGITS_CONFIGS = ('digits/32x32', 'digits/16x16')


def pinned(name: str) -> str:
    """``name==version`` at the version installed here (what the project is tested with)."""
    try:
        return f'{name}=={importlib.metadata.version(name)}'
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f'{name} is not installed here: install the project first '
                         '(pip install -r requirements.txt), then run this again.') from None


def download_wheels(out: str, python_version: str, log) -> list:
    os.makedirs(out, exist_ok=True)
    platform_flags = [flag for p in PLATFORMS for flag in ('--platform', p)]
    for name in DEVICE_PACKAGES:
        requirement = pinned(name)
        command = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps',
                   '--only-binary=:all:', '--python-version', python_version,
                   '--implementation', 'cp', *platform_flags, '-d', out, requirement]
        if subprocess.run(command, capture_output=True, text=True).returncode != 0:
            # Only a source archive is published (promise): build a wheel of it here. Those
            # are pure Python, so the wheel runs on any interpreter.
            log(f'  {requirement}: no wheel published; building one from its source')
            subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--quiet', '--no-deps',
                            '-w', out, requirement], check=True)
        else:
            log(f'  {requirement}')
    return sorted(glob.glob(os.path.join(out, '*.whl')))


def build_digits(data_dir: str, log) -> None:
    import tensorflow_datasets as tfds
    from zskt_jax import datasets  # noqa: F401  (registers 'digits' with TFDS)
    for name in DIGITS_CONFIGS:
        builder = tfds.builder(name, data_dir=data_dir, file_format='array_record')
        builder.download_and_prepare()
        log(f'  {name}: {builder.info.splits.total_num_examples} examples, '
            f'{builder.info.file_format.value}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=os.path.join(ROOT, '.device'),
                        help='the folder to fill (default: .device/ in the checkout, git-ignored)')
    parser.add_argument('--python_version', default='3.12',
                        help="the GPU machine's Python (default 3.12)")
    parser.add_argument('--skip_wheels', action='store_true', help='build the data only')
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)
    if not args.skip_wheels:
        log(f'wheels for CPython {args.python_version}, manylinux x86-64:')
        wheels = download_wheels(os.path.join(args.out, 'wheels'), args.python_version, log)
        size = sum(os.path.getsize(w) for w in wheels) / 2**20
        log(f'  {len(wheels)} wheels, {size:.1f} MiB')
    log('digits as TFDS array_record:')
    build_digits(os.path.join(args.out, 'tensorflow_datasets'), log)
    log(f'ready: {args.out}')


if __name__ == '__main__':
    main()
