"""Optional TLS under every cluster connection (``--tls-cert/--tls-key/--tls-ca``).

With TLS configured, each connection is a mutual TLS session before anything
else: both sides present a certificate signed by the cluster's CA (hostnames are
not checked: the CA is the cluster's own), then the token handshake runs inside
it as without TLS. Without it, connections are plain TCP, authenticated by the
token alone (and readable on the wire).

One setting per process (a process belongs to one cluster): ``configure`` it, or
let the first connection read ``SHAREDCOMPUTE_TLS_CERT``, ``SHAREDCOMPUTE_TLS_KEY``
and ``SHAREDCOMPUTE_TLS_CA`` (all three, or none), which ``sharedcompute start``
sets from its flags for itself and the processes it starts.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading

from sharedcompute.errors import AuthenticationError

CERT_ENV = "SHAREDCOMPUTE_TLS_CERT"
KEY_ENV = "SHAREDCOMPUTE_TLS_KEY"
CA_ENV = "SHAREDCOMPUTE_TLS_CA"

_lock = threading.Lock()
_read = False  # the environment was looked at (or configure() was called)
_contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None = None  # (server, client)


def configure(cert: str | None, key: str | None, ca: str | None) -> None:
    """Use TLS with these files from now on (all None: no TLS)."""
    global _read, _contexts
    named = [cert, key, ca]
    if any(named) and not all(named):
        raise ValueError("TLS needs a certificate, its key and the CA that signed them "
                         "(--tls-cert, --tls-key and --tls-ca), or none of them")
    contexts = None
    if cert and key and ca:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        for context in (server, client):
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(cert, key)
            context.load_verify_locations(ca)
            context.verify_mode = ssl.CERT_REQUIRED
        client.check_hostname = False  # the cluster's own CA vouches for its members
        contexts = (server, client)
    with _lock:
        _contexts, _read = contexts, True


def reset() -> None:
    """Forget the setting (the next connection reads the environment again)."""
    global _read, _contexts
    with _lock:
        _read, _contexts = False, None


def enabled() -> bool:
    return _current() is not None


def _current() -> tuple[ssl.SSLContext, ssl.SSLContext] | None:
    if not _read:
        configure(os.environ.get(CERT_ENV), os.environ.get(KEY_ENV), os.environ.get(CA_ENV))
    return _contexts


def wrap_client(sock: socket.socket, peer: str) -> socket.socket:
    """``sock`` inside a TLS session with the server ``peer`` (unchanged without TLS)."""
    contexts = _current()
    if contexts is None:
        return sock
    try:
        return contexts[1].wrap_socket(sock)
    except (ssl.SSLError, OSError) as error:
        sock.close()
        raise AuthenticationError(f"the TLS handshake with {peer} failed: {error}") from error


def wrap_server(sock: socket.socket, peer: str) -> socket.socket:
    """An accepted ``sock`` inside a TLS session with ``peer`` (unchanged without TLS)."""
    contexts = _current()
    if contexts is None:
        return sock
    try:
        return contexts[0].wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as error:
        raise AuthenticationError(f"{peer} failed the TLS handshake: {error}") from error
