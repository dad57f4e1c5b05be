"""Makes this interpreter look like the GPU image to the test that runs benchmarks/gpu_check.py
(tests/test_benchmark.py), when this folder is first on PYTHONPATH: TensorFlow cannot be found,
and the packages the image lacks (ZSKT_HIDE_FROM_SITE, comma-separated top-level modules) are
found only outside this machine's site-packages, i.e. in the folder the carried wheels are
installed into."""
import importlib.machinery
import os
import site
import sys

_HIDDEN = {'tensorflow'}
_FROM_ELSEWHERE = set(filter(None, os.environ.get('ZSKT_HIDE_FROM_SITE', '').split(',')))
_SITE = tuple(os.path.realpath(p) for p in site.getsitepackages())


class _DeviceLikePathFinder(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split('.')[0] in _HIDDEN:
            return None
        if path is None and name in _FROM_ELSEWHERE:
            path = [p for p in sys.path if not os.path.realpath(p or '.').startswith(_SITE)]
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_DeviceLikePathFinder if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
