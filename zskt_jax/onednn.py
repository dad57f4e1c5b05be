"""Convolutions through oneDNN on XLA:CPU (``config.convolution = 'onednn'``).

XLA:CPU computes convolutions, and above all their kernel gradients, far slower than oneDNN, the
library PyTorch's CPU speed comes from (docs/performance.md has the per-layer numbers). This
module compiles ``cpu_kernels/onednn_conv.cc`` (three XLA FFI custom calls: forward, input
gradient, kernel gradient) against the oneDNN of the ``onednn-cpu-gomp`` package, registers them
with ``jax.ffi``, and offers ``conv_general_dilated``: a drop-in for ``lax.conv_general_dilated``
(``nn.Conv(conv_general_dilated=...)``) whose gradients are a ``custom_vjp`` over the two
backward calls. The result equals XLA's convolution up to float32 rounding (a different order of
summation), so it is a speed mode: off in the paper's configs.

The shared library is built once per oneDNN / jaxlib / source version, with the C++ compiler of
``$CXX`` (else ``g++`` or ``c++``), into ``$ZSKT_JAX_CACHE`` (default ``~/.cache/zskt_jax``):
about 3 seconds. ``python -m zskt_jax.onednn`` builds it ahead and says what was found. Where
there is no compiler, no oneDNN or no CPU backend, ``usable()`` says why and the models keep
XLA's convolutions.
"""
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger('zskt_jax')

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cpu_kernels', 'onednn_conv.cc')
TARGETS = ('forward', 'backward_data', 'backward_weights')
DTYPES = (jnp.float32, jnp.bfloat16)
NHWC = ('NHWC', 'HWIO', 'NHWC')


class Unavailable(RuntimeError):
    """oneDNN's convolutions cannot run here; the message says why and what to install."""


def _prefixes() -> Tuple[str, ...]:
    """Where oneDNN's headers and library may be: this environment's prefix first (pip installs
    ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` there), then the system's."""
    roots = [os.environ.get('ZSKT_ONEDNN_ROOT', ''), sys.prefix, sys.base_prefix, '/usr/local',
             '/usr']
    return tuple(dict.fromkeys(r for r in roots if r))


def find_onednn() -> Tuple[str, str]:
    """(include dir, library dir) of oneDNN, or Unavailable."""
    for root in _prefixes():
        include = os.path.join(root, 'include')
        for lib in ('lib', 'lib64', 'lib/x86_64-linux-gnu'):
            libdir = os.path.join(root, lib)
            if (os.path.exists(os.path.join(include, 'oneapi', 'dnnl', 'dnnl.hpp'))
                    and os.path.exists(os.path.join(libdir, 'libdnnl.so'))):
                return include, libdir
    raise Unavailable('oneDNN not found (looked for include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so '
                      f'under {", ".join(_prefixes())}); pip install -r requirements.txt installs '
                      'it (onednn-cpu-gomp, onednn-devel-cpu-gomp), or set ZSKT_ONEDNN_ROOT')


def find_compiler() -> str:
    for name in (os.environ.get('CXX', ''), 'g++', 'c++', 'clang++'):
        if name and shutil.which(name):
            return shutil.which(name)
    raise Unavailable('no C++ compiler (set CXX, or install g++) to build the oneDNN convolutions')


def cache_dir() -> str:
    return os.environ.get('ZSKT_JAX_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'zskt_jax')


def build(verbose: bool = False) -> str:
    """The path of the compiled library, building it when this source, jaxlib and oneDNN have no
    build yet. Raises Unavailable with the reason when it cannot be built."""
    if not sys.platform.startswith('linux'):
        raise Unavailable(f'the oneDNN convolutions are built for Linux only (this is {sys.platform})')
    include, libdir = find_onednn()
    compiler = find_compiler()
    with open(SOURCE, 'rb') as f:
        source = f.read()
    ffi_include = jax.ffi.include_dir()
    stamp = hashlib.sha256(b'\0'.join([
        source, jax.__version__.encode(), ffi_include.encode(), include.encode(),
        str(os.path.getmtime(os.path.join(libdir, 'libdnnl.so'))).encode()])).hexdigest()[:16]
    target = os.path.join(cache_dir(), f'zskt_onednn_conv-{stamp}.so')
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    # Built under a temporary name and renamed: processes building at once (pytest's workers)
    # never load a half-written file.
    fd, partial = tempfile.mkstemp(suffix='.so', dir=cache_dir())
    os.close(fd)
    command = [compiler, '-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{ffi_include}',
               f'-I{include}', SOURCE, '-o', partial, f'-L{libdir}', '-ldnnl',
               f'-Wl,-rpath,{libdir}']
    if verbose:
        print(' '.join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        os.unlink(partial)
        raise Unavailable(f'building the oneDNN convolutions failed ({compiler}):\n'
                          + done.stderr[-3000:])
    os.replace(partial, target)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[Optional[str], Optional[str]]:
    """(a line naming oneDNN's version and the library, None) once the targets are registered,
    or (None, why not)."""
    if jax.default_backend() != 'cpu':
        return None, f'the backend is {jax.default_backend()}, not cpu (oneDNN is for XLA:CPU)'
    try:
        path = build()
        library = ctypes.cdll.LoadLibrary(path)
    except (Unavailable, OSError) as e:
        return None, str(e)
    for name in TARGETS:
        jax.ffi.register_ffi_target(f'zskt_onednn_conv_{name}',
                                    jax.ffi.pycapsule(getattr(library, f'zskt_onednn_conv_{name}')),
                                    platform='cpu')
    version = library.zskt_onednn_version()
    return (f'oneDNN {version // 10000}.{version // 100 % 100}.{version % 100} convolutions '
            f'({path})'), None


def usable() -> Tuple[bool, str]:
    """(True, a line naming the library and oneDNN version) or (False, why not)."""
    line, why = _load()
    return (True, line) if line else (False, why)


def _varying_axes(x) -> frozenset:
    """The mesh axes over which x varies inside shard_map (empty outside one)."""
    aval = jax.typeof(x)
    manual = getattr(aval, 'manual_axis_type', None)  # jax 0.10; older releases call it vma
    return frozenset(manual.varying if manual is not None else getattr(aval, 'vma', ()))


def _make_varying(x, axes: frozenset):
    missing = tuple(sorted(axes - _varying_axes(x)))
    if not missing:
        return x
    if hasattr(jax.lax, 'pcast'):
        return jax.lax.pcast(x, missing, to='varying')
    return jax.lax.pvary(x, missing)


def _call(name: str, first, second, shape, dtype, strides, padding):
    # The result has the operands' type (shard_map's varying axes included); a vmap (the seeds
    # of config.num_seeds) calls oneDNN once per example.
    result = jax.typeof(first).update(shape=tuple(shape), dtype=jnp.dtype(dtype))
    return jax.ffi.ffi_call(f'zskt_onednn_conv_{name}', result, vmap_method='sequential')(
        first, second, strides=np.asarray(strides, np.int64),
        padding=np.asarray([p for pair in padding for p in pair], np.int64))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: Tuple[int, int], padding: Tuple[Tuple[int, int], Tuple[int, int]]):
    """x [B, H, W, Ci] (NHWC), kernel [kh, kw, Ci, Co] (HWIO) -> [B, H', W', Co], both of one
    dtype (float32 or bfloat16); padding ((top, bottom), (left, right))."""
    return _forward(x, kernel, strides, padding)[0]


def _forward(x, kernel, strides, padding):
    batch, height, width, _ = x.shape
    kh, kw, _, features = kernel.shape
    out_h = (height + sum(padding[0]) - kh) // strides[0] + 1
    out_w = (width + sum(padding[1]) - kw) // strides[1] + 1
    y = _call('forward', x, kernel, (batch, out_h, out_w, features), x.dtype, strides, padding)
    return y, (x, kernel)


def _backward(strides, padding, residuals, dy):
    x, kernel = residuals
    dy = dy.astype(x.dtype)
    dx = _call('backward_data', dy, kernel, x.shape, x.dtype, strides, padding)
    if kernel.shape[:2] == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
        # A 1x1 kernel's gradient is one matrix product over every pixel, [Ci, Co]: XLA's dot
        # runs it several times faster than oneDNN 3.2's 1x1 kernel-gradient primitive at the
        # shortcuts' small spatial sizes (benchmarks/README.md).
        dkernel = jax.lax.dot_general(x, dy, (((0, 1, 2), (0, 1, 2)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dx, dkernel.astype(kernel.dtype).reshape(kernel.shape)
    dkernel = _call('backward_weights', x, dy, kernel.shape, kernel.dtype, strides, padding)
    return dx, dkernel


conv2d.defvjp(_forward, _backward)


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated``'s signature: oneDNN's ``conv2d`` for what it covers (2-D,
    NHWC / HWIO, no dilation or groups, float32 / bfloat16 of one dtype), XLA's convolution for
    the rest."""
    plain = lambda: jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    supported = (lhs.ndim == 4 and numbers == jax.lax.conv_dimension_numbers(
                     lhs.shape, rhs.shape, NHWC)
                 and all(d in (None, 1) for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ()))
                 and feature_group_count == 1
                 and all(p >= 0 for pair in padding for p in pair) and preferred_element_type in (None, lhs.dtype)
                 and lhs.dtype == rhs.dtype and any(lhs.dtype == d for d in DTYPES))
    if not supported:
        return plain()
    strides = tuple(int(s) for s in window_strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if rhs.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)) and strides != (1, 1):
        # A strided 1x1 conv (the shortcuts) is the unstrided one of the strided pixels: oneDNN
        # 3.2's strided 1x1 kernel gradient corrupts memory at some channel counts and odd
        # batches (its copy of the strided pixels), so the striding is a slice here, whose
        # gradient JAX writes.
        lhs = lhs[:, ::strides[0], ::strides[1], :]
        strides = (1, 1)
    # Inside shard_map the kernel is replicated and the images vary over the data axis: the
    # kernel is marked varying here (as lax's convolution does implicitly), so that oneDNN's
    # kernel gradient is the device's own and JAX sums it over devices outside the custom_vjp.
    axes = _varying_axes(lhs) | _varying_axes(rhs)
    return conv2d(_make_varying(lhs, axes), _make_varying(rhs, axes), strides, padding)


def main() -> int:
    """``python -m zskt_jax.onednn``: build the library now and say whether it runs."""
    ok, line = usable()
    print(('ready: ' if ok else 'not available: ') + line)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
