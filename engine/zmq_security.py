"""Optional CurveZMQ on the engine's ZMQ sockets. Both ends derive the server's keypair from one shared
secret, so only a holder of the secret can complete the handshake (a client that does not know the server's
public key cannot talk to it), and every frame is encrypted. No secret: plain sockets, as before."""
from __future__ import annotations

import hashlib

import zmq
from zmq.utils import z85


def _server_keys(secret: str) -> tuple[bytes, bytes]:
    private = z85.encode(hashlib.sha256(b"slipstream-zmq-curve:" + secret.encode()).digest())
    return zmq.curve_public(private), private


def secure_server(sock: zmq.Socket, secret: str | None) -> None:
    """Before bind: the socket accepts CURVE clients that know `secret` only."""
    if secret:
        public, private = _server_keys(secret)
        sock.curve_publickey, sock.curve_secretkey = public, private
        sock.curve_server = True


def secure_client(sock: zmq.Socket, secret: str | None) -> None:
    """Before connect: the socket speaks CURVE to a server keyed with `secret` (its own keys are random)."""
    if secret:
        sock.curve_serverkey = _server_keys(secret)[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
