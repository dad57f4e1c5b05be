"""HTTPS-terminating forward proxy that sends *.googleapis.com GCS traffic to a
local plain-HTTP GCS emulator. Needed for TensorFlow's built-in gs:// filesystem
(tf.io.gfile), whose endpoints (https://www.googleapis.com/storage/v1/,
https://www.googleapis.com/upload/storage/v1/, https://storage.googleapis.com/)
are hard-coded. TF's libcurl honours `https_proxy` and `CURL_CA_BUNDLE`.
"""
import datetime
import http.client
import http.server
import os
import socketserver
import ssl
import tempfile
import threading
import urllib.parse

_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def make_certs(directory):
    """Write ca.pem (the trust anchor the clients get) and a leaf certificate and key for the
    googleapis hosts, signed by it; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject, public_key, issuer, signing_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public_key).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    def name(common_name):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name('test-gcs-ca'), ca_key.public_key(), name('test-gcs-ca'), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    leaf = certificate(name(_HOSTS[0]), key.public_key(), name('test-gcs-ca'), ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName(h) for h in _HOSTS]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    pem = serialization.Encoding.PEM
    contents = {'ca.pem': ca.public_bytes(pem), 'leaf.pem': leaf.public_bytes(pem),
                'leaf.key': key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())}
    paths = {}
    for file_name, content in contents.items():
        paths[file_name] = os.path.join(directory, file_name)
        with open(paths[file_name], 'wb') as f:
            f.write(content)
    return paths


_HOP = {'connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te',
        'trailer', 'upgrade', 'proxy-authorization', 'host', 'expect'}


class _Forward(http.server.BaseHTTPRequestHandler):
    """Reads HTTP/1.1 requests (inside the TLS tunnel) and replays them on the emulator."""
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True  # avoids ~40 ms delayed-ACK stalls per request
    upstream = None  # (host, port)

    def log_message(self, *args):
        pass

    def _forward(self):
        path = self.path
        if path.startswith('http'):  # absolute-form (plain http via proxy)
            u = urllib.parse.urlsplit(path)
            path = u.path + ('?' + u.query if u.query else '')
        n = int(self.headers.get('Content-Length') or 0)
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            body = b''
            while True:
                size = int(self.rfile.readline().split(b';')[0], 16)
                if not size:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    break
                body += self.rfile.read(size)
                self.rfile.readline()
        else:
            body = self.rfile.read(n) if n else (
                    b'' if self.command in ('POST', 'PUT', 'PATCH') else None)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        if body is not None:
            headers['Content-Length'] = str(len(body))
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.send_error(502, f'emulator failed: {e!r}')
            return
        finally:
            conn.close()
        self.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != 'content-length':
                if k.lower() == 'location':
                    # Keep resumable-upload PUTs inside the tunnel: TF sends them with
                    # both "Transfer-Encoding: chunked" and Content-Length, which the
                    # emulator mis-parses; this proxy de-chunks them.
                    v = v.replace('http://%s:%d' % self.upstream, 'https://www.googleapis.com')
                self.send_header(k, v)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _forward


class _Proxy(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    disable_nagle_algorithm = True
    ssl_ctx = None
    upstream = None

    def log_message(self, *args):
        pass

    def do_CONNECT(self):
        host = self.path.split(':')[0]
        if host not in _HOSTS:
            self.send_error(403, f'proxy only serves {_HOSTS}')
            return
        self.send_response_only(200, 'Connection established')
        self.end_headers()
        self.wfile.flush()
        tls = self.ssl_ctx.wrap_socket(self.connection, server_side=True)
        fwd = type('F', (_Forward,), {'upstream': self.upstream})
        try:
            fwd(tls, self.client_address, self.server)
        except (ssl.SSLError, OSError):
            pass
        finally:
            self.close_connection = True
            try:
                tls.close()
            except OSError:
                pass

    def _plain(self):  # absolute-form http:// requests
        fwd = type('F', (_Forward,), {'upstream': self.upstream})
        fwd._forward(self)

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _plain


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def start(emulator_url, cert_dir=None):
    """Starts the proxy; returns (server, proxy_url, ca_bundle_path)."""
    cert_dir = cert_dir or tempfile.mkdtemp(prefix='gcs_tls_')
    certs = make_certs(cert_dir)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs['leaf.pem'], certs['leaf.key'])
    u = urllib.parse.urlsplit(emulator_url)
    handler = type('P', (_Proxy,), {'ssl_ctx': ctx, 'upstream': (u.hostname, u.port)})
    srv = _Server(('127.0.0.1', 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}', certs['ca.pem']
