"""gcp-storage-emulator on loopback, with what TensorFlow's gs:// file system needs patched in."""
import socket
import time
from http import HTTPStatus

from gcp_storage_emulator import server as _server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as _objects


def _storage_layout(request, response, storage, *args, **kwargs):
    """GET /storage/v1/b/B/storageLayout: TensorFlow >= 2.18 asks before renaming a directory
    (hierarchical-namespace buckets) and fails on the emulator's 404."""
    response.json({'kind': 'storage#storageLayout', 'bucket': request.params['bucket_name'],
                   'location': 'US', 'locationType': 'multi-region',
                   'hierarchicalNamespace': {'enabled': False}})


_LAYOUT = r'^(?:/storage/v1)?/b/(?P<bucket_name>[-.\w]+)/storageLayout$'
if not any(pattern == _LAYOUT for pattern, _ in _server.HANDLERS):
    _server.HANDLERS = ((_LAYOUT, {_server.GET: _storage_layout}),) + tuple(_server.HANDLERS)

_media_upload = _objects._media_upload


def _media_upload_of_empty_objects(request, response, storage):
    """TensorFlow's directory markers ('dir/', zero bytes) arrive with no data at all."""
    if request.data is None:
        request._data = b''
    return _media_upload(request, response, storage)


_objects._media_upload = _media_upload_of_empty_objects
_server.RequestHandler.disable_nagle_algorithm = True  # ~50 ms of delayed ACK per request


class _Microseconds:
    """The emulator's object generations from ``time.time_ns()`` are 1000 times GCS's
    (microseconds); TensorStore's OCDBT manifests then fail with 'Malformed StorageGeneration'."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def time_ns():
        return time.time_ns() // 1000


_objects.time = _Microseconds()


def _conditional(handler):
    """GCS's preconditions (ifGenerationMatch / ifGenerationNotMatch: 412 / 304) and the
    x-goog-generation header of a read, which the emulator lacks and TensorStore's OCDBT (Orbax)
    relies on for its manifests."""
    def conditional(request, response, storage, *args, **kwargs):
        bucket = request.params.get('bucket_name')
        name = request.params.get('object_id') or request.query.get('name', [None])[0]
        if bucket and name:
            try:
                generation = str(storage.get_file_obj(bucket, name)['generation'])
            except NotFound:
                generation = '0'  # GCS's "does not exist"
            match = request.query.get('ifGenerationMatch', [None])[0]
            not_match = request.query.get('ifGenerationNotMatch', [None])[0]
            if match is not None and match != generation:
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
            if not_match is not None and not_match == generation:
                response.status = HTTPStatus.NOT_MODIFIED
                return None
            if request.method == _server.GET and generation != '0':
                response['x-goog-generation'] = generation
        return handler(request, response, storage, *args, **kwargs)
    return conditional


_CONDITIONAL = {_objects.get, _objects.download, _objects.insert, _objects.delete}
_server.HANDLERS = tuple(
    (pattern, {method: _conditional(f) if f in _CONDITIONAL else f
               for method, f in methods.items()})
    for pattern, methods in _server.HANDLERS)


def start(bucket: str):
    """(server, its URL) of an in-memory emulator holding ``bucket``, on a free loopback port."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    server = _server.create_server('127.0.0.1', port, in_memory=True, default_bucket=bucket)
    server.start()
    return server, f'http://127.0.0.1:{port}'
