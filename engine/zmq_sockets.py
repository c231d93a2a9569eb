"""The engine's ZMQ sockets, made one way: a ROUTER that binds (engine core, rank 0's worker channel) and
DEALERs that connect (API fronts, workers), with no linger and no high-water marks (the engines bound their
queues themselves), and optional CurveZMQ. Both ends derive the server's keypair from one shared secret, so
only a holder of the secret can complete the handshake (a client that does not know the server's public key
cannot talk to it), and every frame is encrypted. No secret: plain sockets."""
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


def _plain(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    return sock


def bind_router(ctx: zmq.Context, address: str, secret: str | None, max_frame_bytes: int | None = None) -> zmq.Socket:
    """A ROUTER bound at `address`; sends to a vanished peer raise (ROUTER_MANDATORY), so work can be aborted."""
    sock = _plain(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if max_frame_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
    secure_server(sock, secret)
    sock.bind(address)
    return sock


def connect_dealer(ctx: zmq.Context, address: str, secret: str | None, identity: bytes | None = None) -> zmq.Socket:
    sock = _plain(ctx.socket(zmq.DEALER))
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    secure_client(sock, secret)
    sock.connect(address)
    return sock
