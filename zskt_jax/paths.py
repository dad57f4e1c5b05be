"""Paths: local directories and URLs (``gs://BUCKET/...`` on a TPU pod, whose workers share no
disk) alike, through ``etils.epath``, the path API Orbax and TFDS use too. ``os.path.join``
and ``os.path.dirname`` already serve URLs as they are strings of '/'-separated parts."""
import os

from etils import epath


def is_url(path) -> bool:
    return '://' in os.fspath(path)


def absolute(path) -> str:
    """A local path made absolute (as runs record it); a URL as it is."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def write_text(path, text: str) -> None:
    """Write a whole file at once: a temporary file renamed into place, so that a reader never
    sees half of it (on a local disk; a GCS object appears whole anyway)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (path.name + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)
