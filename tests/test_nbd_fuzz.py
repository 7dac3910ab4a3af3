# SPDX-License-Identifier: GPL-2.0-or-later
"""Protocol fuzzing of the NBD server's handshake and request parser
(pyaioctx.nbd, port of QEMU's nbd/server.c).

One server runs for the whole module.  Each example throws arbitrary bytes
at it -- after the greeting, or after a good handshake -- and then checks
that the server is still healthy: a well-behaved client connects, writes and
reads back.  Whatever the bytes, the server answers each option or request
or closes the connection; it never hangs, crashes or corrupts other clients.
"""

from __future__ import annotations

import shutil
import socket
import struct
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyaioctx.nbd import (
    NBD_OPTS_MAGIC,
    NBD_REQUEST_MAGIC,
)
from conftest import _scratch_root
from test_nbd import RawClient, file_server

_FUZZ = settings(max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture,
                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server():
    # One server for the module, in the same scratch area disk_dir uses.
    d = _scratch_root() / f"nbdfuzz-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        st, _ = file_server(d, handshake_limit=2.0)
        with st:
            yield st
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _drain(s: socket.socket) -> None:
    """Read whatever the server says until it closes or goes quiet."""
    s.settimeout(0.05)
    try:
        while s.recv(65536):
            pass
    except (socket.timeout, ConnectionResetError, BrokenPipeError):
        pass


def _healthy(server) -> None:
    c = RawClient(server.connect()).connect()
    assert c.write(0, b"\xC3" * 512, handle=7) == 0
    assert c.read(0, 512, handle=8) == (0, b"\xC3" * 512)
    c.s.close()


# Options built from real option numbers with random lengths and payloads,
# mixed with raw garbage.
_option = st.builds(
    lambda magic, opt, data, lie: struct.pack(">QII", magic, opt,
                                              len(data) if lie is None else lie) + data,
    st.sampled_from([NBD_OPTS_MAGIC, NBD_OPTS_MAGIC, NBD_OPTS_MAGIC, 0]),
    st.integers(0, 12) | st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
    st.none() | st.integers(0, 128),
)


@_FUZZ
@given(cflags=st.integers(0, 2**32 - 1) | st.sampled_from([1, 3]),
       opts=st.lists(_option | st.binary(max_size=40), max_size=5))
def test_fuzz_handshake(server, cflags: int, opts: list) -> None:
    s = server.connect()
    try:
        s.recv(18)
        s.sendall(struct.pack(">I", cflags) + b"".join(opts))
        _drain(s)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    _healthy(server)


_request = st.builds(
    lambda magic, flags, type, handle, offset, length, payload:
        struct.pack(">IHHQQI", magic, flags, type, handle, offset, length) + payload,
    st.sampled_from([NBD_REQUEST_MAGIC] * 6 + [0x67446698]),
    st.integers(0, 0xFFFF) | st.sampled_from([0, 1, 2, 4, 8, 16]),
    st.integers(0, 10) | st.integers(0, 0xFFFF),
    st.integers(0, 2**64 - 1),
    st.integers(0, 8 << 20) | st.integers(0, 2**64 - 1),
    st.integers(0, 8192) | st.integers(0, 2**32 - 1),
    st.binary(max_size=256),
)


@_FUZZ
@given(reqs=st.lists(_request | st.binary(max_size=40), min_size=1, max_size=6))
def test_fuzz_requests(server, reqs: list) -> None:
    c = RawClient(server.connect()).connect()
    try:
        # Never ask the server to disconnect cleanly; a write that promises
        # more payload than follows just leaves the server waiting, then EOF.
        blob = b"".join(r for r in reqs if r[4:8] != struct.pack(">HH", 0, 2) or len(r) != 28)
        c.s.sendall(blob)
        _drain(c.s)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        c.s.close()
    _healthy(server)


def test_fuzz_server_state_after(server) -> None:
    """After the fuzzing, every fuzzing connection has been cleaned up."""
    import time
    deadline = time.monotonic() + 5
    while server.call(lambda: len(server.server.clients)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.call(lambda: len(server.server.clients)) == 0
    _healthy(server)
