# SPDX-License-Identifier: GPL-2.0-or-later
"""The NBD server (pyaioctx.nbd, port of QEMU's nbd/server.c) and ``pyaioctx nbd``.

Servers run in a background thread that owns its own AioContext (the device
is moved into it, as QEMU's iothread export option does), or as a ``pyaioctx
nbd`` subprocess.  Real clients drive them: qemu-io, qemu-img, nbdinfo,
nbdcopy and the libnbd Python bindings (through Debian's /usr/bin/python3),
plus a raw-socket client for the protocol's corners.  Each external tool's
test is skipped with a reason when the tool is missing.

Invariants: what a client wrote reads back; replies match requests by
handle even out of order; a bad handshake or request gets the protocol's
error (or a closed connection) and never disturbs the server or the other
clients; FLUSH and FUA reach the driver's flush before the reply leaves.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

import pyaioctx as q
from pyaioctx.block import (
    BDRV_O_RDWR,
    BlockDriver,
    bdrv_open,
    bdrv_register,
    bdrv_unref,
    bdrv_unregister,
)
from pyaioctx.nbd import (
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_STARTTLS,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_SERVER,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDServer,
    system_errno_to_nbd_errno,
)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 4 * 1024 * 1024
TIMEOUT = 10

# --------------------------------------------------------------------------
# Helpers


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


def need(*tools: str) -> None:
    for t in tools:
        if not have(t):
            pytest.skip(f"{t} is not installed")


_libnbd_ok: Optional[bool] = None


def need_libnbd() -> None:
    global _libnbd_ok
    if _libnbd_ok is None:
        _libnbd_ok = os.path.exists("/usr/bin/python3") and subprocess.run(
            ["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0
    if not _libnbd_ok:
        pytest.skip("the libnbd Python bindings (python3-libnbd for /usr/bin/python3) are missing")


def make_image(path: Path, size: int = SIZE, seed: int = 1) -> bytes:
    data = bytes((i * 7 + seed) & 0xFF for i in range(256)) * (size // 256)
    path.write_bytes(data)
    return data


class ServerThread:
    """An NBDServer in a background thread with its own AioContext.

    ``open_bs()`` runs in that thread; the device is moved into the thread's
    context by NBDServer.  ``stop()`` closes the server (drain, flush), drops
    the device and the context and joins the thread.
    """

    def __init__(self, open_bs: Callable[[], Any], unix: Optional[str] = None,
                 **kw: Any) -> None:
        q.qemu_init_main_loop()  # the main context belongs to the test thread
        self.open_bs = open_bs
        self.unix = unix
        self.kw = kw
        self.ctx: Any = None
        self.server: Optional[NBDServer] = None
        self.error: Optional[BaseException] = None
        self._stop = False
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nbd-server", daemon=True)

    def _run(self) -> None:
        ctx = self.ctx = q.aio_context_new()
        q.qemu_set_current_aio_context(ctx)
        bs = None
        try:
            bs = self.open_bs()
            srv = self.server = NBDServer(bs, ctx=ctx, **self.kw)
            if self.unix:
                srv.listen_unix(self.unix)
            else:
                srv.listen_tcp("127.0.0.1", 0)
            self._ready.set()
            srv.run(lambda: self._stop)
            srv.close()
        except BaseException as e:  # reported by stop()
            self.error = e
        finally:
            self._ready.set()
            if bs is not None:
                bdrv_unref(bs)
            q.qemu_set_current_aio_context(None)
            q.aio_context_unref(ctx)

    def start(self) -> "ServerThread":
        self.thread.start()
        assert self._ready.wait(TIMEOUT)
        if self.error:
            raise self.error
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the server's thread and return its result."""
        box: list = []
        done = threading.Event()

        def bh(_: Any) -> None:
            try:
                box.append(fn())
            finally:
                done.set()
        q.aio_bh_schedule_oneshot(self.ctx, bh, None)
        assert done.wait(TIMEOUT)
        return box[0] if box else None

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port  # type: ignore[return-value]

    def uri(self, name: str = "") -> str:
        if self.unix:
            return f"nbd+unix:///{name}?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    def connect(self) -> socket.socket:
        if self.unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.unix)
        else:
            s = socket.create_connection(("127.0.0.1", self.port))
        s.settimeout(TIMEOUT)
        return s

    def stop(self) -> None:
        self._stop = True
        if self.ctx is not None and not self.ctx.closed:
            try:
                q.aio_notify(self.ctx)
            except Exception:
                pass
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "server thread did not stop"
        if self.error:
            raise self.error

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def file_server(disk_dir: Path, unix: bool = True, data: Optional[bytes] = None,
                options: Optional[dict] = None, flags: int = BDRV_O_RDWR,
                **kw: Any) -> tuple[ServerThread, Path]:
    img = disk_dir / "disk.img"
    if data is None:
        make_image(img)
    else:
        img.write_bytes(data)
    opts = {"driver": "file", **(options or {})}
    st = ServerThread(lambda: bdrv_open(str(img), opts, flags),
                      unix=str(disk_dir / "nbd.sock") if unix else None, **kw)
    return st, img


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def is_closed(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset)."""
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


class RawClient:
    """A minimal NBD client over a plain socket, to send what real clients
    never would."""

    def __init__(self, s: socket.socket) -> None:
        self.s = s
        self.size = 0
        self.flags = 0

    def greet(self, cflags: int = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) -> int:
        magic, opts, hflags = struct.unpack(">QQH", recv_exact(self.s, 18))
        assert magic == NBD_INIT_MAGIC and opts == NBD_OPTS_MAGIC
        self.s.sendall(struct.pack(">I", cflags))
        return hflags

    def opt(self, opt: int, data: bytes = b"") -> None:
        self.s.sendall(struct.pack(">QII", NBD_OPTS_MAGIC, opt, len(data)) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, ln = struct.unpack(">QIII", recv_exact(self.s, 20))
        assert magic == NBD_REP_MAGIC
        return opt, rtype, recv_exact(self.s, ln)

    def go(self, name: str = "", opt: int = NBD_OPT_GO) -> list:
        nb = name.encode()
        self.opt(opt, struct.pack(">I", len(nb)) + nb + struct.pack(">HH", 1, NBD_INFO_BLOCK_SIZE))
        replies = []
        while True:
            o, t, d = self.reply()
            replies.append((t, d))
            if t == NBD_REP_INFO and struct.unpack(">H", d[:2])[0] == NBD_INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", d[2:12])
            if t == NBD_REP_ACK or t & (1 << 31):
                return replies

    def connect(self, name: str = "") -> "RawClient":
        self.greet()
        replies = self.go(name)
        assert replies[-1][0] == NBD_REP_ACK, replies
        return self

    def request(self, type: int, offset: int = 0, length: int = 0, handle: int = 1,
                flags: int = 0, payload: bytes = b"") -> None:
        self.s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, type, handle,
                                   offset, length) + payload)

    def simple_reply(self, datalen: int = 0) -> tuple[int, int, bytes]:
        magic, err, handle = struct.unpack(">IIQ", recv_exact(self.s, 16))
        assert magic == NBD_SIMPLE_REPLY_MAGIC, hex(magic)
        data = recv_exact(self.s, datalen) if (datalen and not err) else b""
        return err, handle, data

    def read(self, offset: int, length: int, handle: int = 1) -> tuple[int, bytes]:
        self.request(NBD_CMD_READ, offset, length, handle)
        err, h, data = self.simple_reply(length)
        assert h == handle
        return err, data

    def write(self, offset: int, data: bytes, handle: int = 1, flags: int = 0) -> int:
        self.request(NBD_CMD_WRITE, offset, len(data), handle, flags, data)
        err, h, _ = self.simple_reply()
        assert h == handle
        return err


def run(cmd: list, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


# --------------------------------------------------------------------------
# Protocol helpers


def test_errno_mapping() -> None:
    assert system_errno_to_nbd_errno(0) == 0
    assert system_errno_to_nbd_errno(errno.EROFS) == NBD_EPERM
    assert system_errno_to_nbd_errno(errno.EFBIG) == NBD_ENOSPC
    assert system_errno_to_nbd_errno(errno.EBADF) == NBD_EINVAL


def test_server_api_errors(disk_dir: Path) -> None:
    q.qemu_init_main_loop()
    with pytest.raises(TypeError):
        NBDServer("not a device", ctx=q.qemu_get_aio_context())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        NBDServer(None, ctx=q.qemu_get_aio_context(), max_connections=-1)
    bs = bdrv_open(None, {"driver": "null-co", "size": 1 << 20}, BDRV_O_RDWR)
    try:
        srv = NBDServer(bs, "a", ctx=q.qemu_get_aio_context())
        with pytest.raises(ValueError, match="already exists"):
            srv.add_export(bs, "a")
        srv.close()
        with pytest.raises(ValueError, match="closed"):
            srv.listen_unix(str(disk_dir / "x.sock"))
    finally:
        bdrv_unref(bs)


# --------------------------------------------------------------------------
# Raw protocol: handshake


def test_handshake_and_flags(disk_dir: Path) -> None:
    st, _ = file_server(disk_dir, description="a disk")
    with st:
        c = RawClient(st.connect())
        assert c.greet() == 3  # FIXED_NEWSTYLE | NO_ZEROES
        c.opt(NBD_OPT_LIST)
        o, t, d = c.reply()
        assert (o, t) == (NBD_OPT_LIST, NBD_REP_SERVER) and d == struct.pack(">I", 0)
        assert c.reply()[1] == NBD_REP_ACK
        # OPT_INFO: block size info and the export info, then ACK.
        replies = c.go("", NBD_OPT_INFO)
        infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in replies if t == NBD_REP_INFO}
        assert struct.unpack(">III", infos[NBD_INFO_BLOCK_SIZE])[1] == 4096
        assert infos[2] == b"a disk"  # NBD_INFO_DESCRIPTION
        size, flags = struct.unpack(">QH", infos[NBD_INFO_EXPORT])
        assert size == SIZE
        assert flags & NBD_FLAG_SEND_FLUSH and flags & NBD_FLAG_SEND_FUA
        assert flags & NBD_FLAG_CAN_MULTI_CONN and not flags & NBD_FLAG_READ_ONLY
        # Unsupported, unknown and malformed options are refused, the
        # connection stays usable.
        for opt in (NBD_OPT_STARTTLS, 4, 11, 99):
            c.opt(opt)
            assert c.reply()[1] == NBD_REP_ERR_UNSUP
        c.opt(NBD_OPT_LIST, b"junk")
        assert c.reply()[1] == NBD_REP_ERR_INVALID
        c.opt(NBD_OPT_GO, struct.pack(">I", 100) + b"x")
        assert c.reply()[1] == NBD_REP_ERR_INVALID
        assert c.go("nope")[-1][0] == NBD_REP_ERR_UNKNOWN
        assert c.go("")[-1][0] == NBD_REP_ACK
        err, data = c.read(0, 512)
        assert err == 0 and data == make_image(disk_dir / "ref", 512)
        c.request(NBD_CMD_DISC)
        assert is_closed(c.s)
        c.s.close()


def test_export_name_and_abort(disk_dir: Path) -> None:
    st, _ = file_server(disk_dir, name="disk0")
    with st:
        # NBD_OPT_EXPORT_NAME without NO_ZEROES: size, flags, 124 zeroes.
        c = RawClient(st.connect())
        c.greet(NBD_FLAG_C_FIXED_NEWSTYLE)
        c.opt(NBD_OPT_EXPORT_NAME, b"disk0")
        size, flags = struct.unpack(">QH", recv_exact(c.s, 10))
        assert size == SIZE and recv_exact(c.s, 124) == bytes(124)
        assert c.write(0, b"\x55" * 512) == 0
        c.s.close()
        # An unknown name can only be answered by closing.
        c = RawClient(st.connect())
        c.greet()
        c.opt(NBD_OPT_EXPORT_NAME, b"other")
        assert is_closed(c.s)
        c.s.close()
        # NBD_OPT_ABORT: ACK, then the server closes.
        c = RawClient(st.connect())
        c.greet()
        c.opt(NBD_OPT_ABORT)
        assert c.reply()[1] == NBD_REP_ACK
        assert is_closed(c.s)
        c.s.close()
        assert RawClient(st.connect()).connect("disk0").read(0, 512)[1] == b"\x55" * 512


@pytest.mark.parametrize("bad", ["flags", "magic", "huge-option", "oldstyle-option", "eof"])
def test_malformed_handshake_closes(disk_dir: Path, bad: str) -> None:
    st, _ = file_server(disk_dir)
    with st:
        other = RawClient(st.connect()).connect()  # an innocent bystander
        c = RawClient(st.connect())
        if bad == "flags":
            c.greet(0x80)
        elif bad == "magic":
            c.greet()
            c.s.sendall(struct.pack(">QII", 0x1234, NBD_OPT_GO, 0))
        elif bad == "huge-option":
            c.greet()
            c.s.sendall(struct.pack(">QII", NBD_OPTS_MAGIC, NBD_OPT_GO, NBD_MAX_BUFFER_SIZE + 1))
        elif bad == "oldstyle-option":
            c.greet(0)  # not fixed newstyle: no way to refuse an option
            c.opt(NBD_OPT_LIST)
        else:
            c.greet()
            c.s.sendall(struct.pack(">QI", NBD_OPTS_MAGIC, NBD_OPT_GO))  # truncated
            c.s.shutdown(socket.SHUT_WR)
        assert is_closed(c.s)
        c.s.close()
        assert other.write(4096, b"\xAA" * 4096) == 0
        assert other.read(4096, 4096) == (0, b"\xAA" * 4096)
        other.s.close()


def test_handshake_limit(disk_dir: Path) -> None:
    st, _ = file_server(disk_dir, handshake_limit=0.2)
    with st:
        s = st.connect()
        recv_exact(s, 18)
        t0 = time.monotonic()
        assert is_closed(s)  # dropped by the timer, not by our timeout
        assert time.monotonic() - t0 < 5
        s.close()
        RawClient(st.connect()).connect().s.close()


# --------------------------------------------------------------------------
# Raw protocol: requests


def test_request_errors(disk_dir: Path) -> None:
    st, _ = file_server(disk_dir)
    with st:
        c = RawClient(st.connect()).connect()
        # Out of range: EINVAL for reads, ENOSPC for writes; nothing written.
        assert c.read(SIZE - 512, 1024)[0] == NBD_EINVAL
        assert c.read(SIZE + 1, 0)[0] == NBD_EINVAL
        assert c.write(SIZE - 512, b"x" * 1024) == NBD_ENOSPC
        c.request(NBD_CMD_WRITE_ZEROES, SIZE, 512, handle=5)
        assert c.simple_reply() == (NBD_ENOSPC, 5, b"")
        # Unknown command and unadvertised commands: EINVAL.
        for h, cmd in enumerate((NBD_CMD_CACHE, 8, 77), 10):
            c.request(cmd, 0, 512, handle=h)
            assert c.simple_reply() == (NBD_EINVAL, h, b"")
        # Unknown flags: EINVAL.
        c.request(NBD_CMD_FLUSH, flags=0x100, handle=20)
        assert c.simple_reply() == (NBD_EINVAL, 20, b"")
        # BLOCK_STATUS without negotiation: EINVAL.
        c.request(NBD_CMD_BLOCK_STATUS, 0, 512, handle=21)
        assert c.simple_reply() == (NBD_EINVAL, 21, b"")
        # Oversized read: EINVAL and the connection lives on.
        c.request(NBD_CMD_READ, 0, NBD_MAX_BUFFER_SIZE + 1, handle=22)
        assert c.simple_reply() == (NBD_EINVAL, 22, b"")
        assert c.read(0, 512)[0] == 0
        # Zero-length requests are harmless.
        assert c.read(0, 0) == (0, b"")
        # Oversized write: EINVAL, then disconnect (its payload is not read).
        c.request(NBD_CMD_WRITE, 0, NBD_MAX_BUFFER_SIZE + 1, handle=23)
        assert c.simple_reply() == (NBD_EINVAL, 23, b"")
        assert is_closed(c.s)
        c.s.close()
        # A request with a bad magic: the stream is lost, disconnect.
        c = RawClient(st.connect()).connect()
        c.s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, NBD_CMD_READ, 1, 0, 512))
        assert is_closed(c.s)
        c.s.close()
        # Truncated request header, then EOF; a write whose payload never
        # comes: the server shrugs, nothing is written.
        c = RawClient(st.connect()).connect()
        c.s.sendall(struct.pack(">IHH", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ))
        c.s.close()
        c = RawClient(st.connect()).connect()
        c.request(NBD_CMD_WRITE, 0, 8192, 1, 0, b"\xEE" * 4096)
        c.s.close()
        c = RawClient(st.connect()).connect()
        assert c.read(0, 8192) == (0, make_image(disk_dir / "ref", 8192))
        c.s.close()


def test_read_only(disk_dir: Path) -> None:
    st, img = file_server(disk_dir, readonly=True, max_connections=1)
    with st:
        c = RawClient(st.connect()).connect()
        assert c.flags & NBD_FLAG_READ_ONLY
        assert not c.flags & NBD_FLAG_CAN_MULTI_CONN  # -e 1
        assert c.write(0, b"z" * 512) == NBD_EPERM
        for h, cmd in enumerate((NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES), 2):
            c.request(cmd, 0, 512, handle=h)
            assert c.simple_reply() == (NBD_EPERM, h, b"")
        c.request(NBD_CMD_FLUSH, handle=9)
        assert c.simple_reply() == (0, 9, b"")
        c.s.close()
    assert img.read_bytes()[:512] == make_image(disk_dir / "ref", 512)


class _Recorder:
    """A user block driver that records every call and can delay reads at
    offset 0, to observe out-of-order replies and flush ordering."""

    def __init__(self, size: int = 1 << 20) -> None:
        self.size = size
        self.data = bytearray(size)
        self.log: list = []
        self.slow_ns = 0
        self.drv = BlockDriver(
            format_name=f"nbd-test-recorder-{id(self)}",
            bdrv_open=lambda bs, options, flags: 0,
            bdrv_getlength=lambda bs: self.size,
            bdrv_co_preadv=self.preadv,
            bdrv_co_pwritev=self.pwritev,
            bdrv_co_flush_to_disk=self.flush,
        )

    def preadv(self, bs: Any, offset: int, nbytes: int, qiov: Any, flags: int) -> int:
        if offset == 0 and self.slow_ns:
            q.qemu_co_sleep_ns(q.QEMU_CLOCK_REALTIME, self.slow_ns)
        q.qemu_iovec_from_buf(qiov, 0, self.data[offset:offset + nbytes], nbytes)
        self.log.append(("read", offset))
        return 0

    def pwritev(self, bs: Any, offset: int, nbytes: int, qiov: Any, flags: int) -> int:
        buf = bytearray(nbytes)
        q.qemu_iovec_to_buf(qiov, 0, buf, nbytes)
        self.data[offset:offset + nbytes] = buf
        self.log.append(("write", offset))
        return 0

    def flush(self, bs: Any) -> int:
        self.log.append(("flush",))
        return 0


@pytest.fixture
def recorder():
    r = _Recorder()
    bdrv_register(r.drv)
    yield r
    bdrv_unregister(r.drv)


def test_out_of_order_replies_and_fua(disk_dir: Path, recorder: _Recorder) -> None:
    recorder.slow_ns = 300_000_000
    st = ServerThread(lambda: bdrv_open(None, {"driver": recorder.drv.format_name}, BDRV_O_RDWR),
                      unix=str(disk_dir / "r.sock"))
    with st:
        c = RawClient(st.connect()).connect()
        # A slow read, then a fast one: the fast one is answered first.
        c.request(NBD_CMD_READ, 0, 512, handle=1)
        c.request(NBD_CMD_READ, 4096, 512, handle=2)
        err, h, _ = c.simple_reply(512)
        assert (err, h) == (0, 2)
        err, h, _ = c.simple_reply(512)
        assert (err, h) == (0, 1)
        recorder.slow_ns = 0
        # FUA: the flush reaches the driver before the reply is sent.
        del recorder.log[:]
        assert c.write(8192, b"\x11" * 512, handle=3, flags=NBD_CMD_FLAG_FUA) == 0
        assert recorder.log == [("write", 8192), ("flush",)]
        # FLUSH after a plain write reaches the driver too.
        del recorder.log[:]
        assert c.write(0, b"\x22" * 512, handle=4) == 0
        c.request(NBD_CMD_FLUSH, handle=5)
        assert c.simple_reply() == (0, 5, b"")
        assert recorder.log == [("write", 0), ("flush",)]
        c.s.close()


def test_many_in_flight_and_clients(disk_dir: Path) -> None:
    st, img = file_server(disk_dir, unix=False)
    with st:
        clients = [RawClient(st.connect()).connect() for _ in range(4)]
        # Each client pipelines 40 writes (more than MAX_NBD_REQUESTS) to
        # its own quarter, then reads everything back in one burst.
        quarter = SIZE // 4
        for i, c in enumerate(clients):
            blob = b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, h,
                                        i * quarter + h * 4096, 4096) + bytes([i * 40 + h]) * 4096
                            for h in range(40))
            c.s.sendall(blob)
        for c in clients:
            handles = set()
            for _ in range(40):
                err, h, _ = c.simple_reply()
                assert err == 0
                handles.add(h)
            assert handles == set(range(40))
        for i, c in enumerate(clients):
            for h in range(40):
                c.request(NBD_CMD_READ, i * quarter + h * 4096, 4096, handle=h)
            got = {}
            for _ in range(40):
                err, h, data = c.simple_reply(4096)
                got[h] = data
            assert all(got[h] == bytes([i * 40 + h]) * 4096 for h in range(40))
            c.request(NBD_CMD_DISC)
            c.s.close()
    raw = img.read_bytes()
    assert raw[3 * quarter + 39 * 4096] == 3 * 40 + 39


class _CountingSocket:
    """Stands in for a client's server-side socket and counts sendmsg calls
    (every other attribute is the real socket's)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sendmsg_calls = 0

    def sendmsg(self, bufs: Any, *a: Any) -> int:
        self.sendmsg_calls += 1
        return self._sock.sendmsg(bufs, *a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _count_sends(st: ServerThread) -> _CountingSocket:
    def swap() -> _CountingSocket:
        (client,) = st.server.clients  # type: ignore[union-attr]
        client.sock = _CountingSocket(client.sock)
        return client.sock
    return st.call(swap)


def test_pipelined_replies_go_out_in_one_write(disk_dir: Path) -> None:
    """Replies to requests that arrived in one burst are corked and sent
    together: one sendmsg (one wake-up of the client) instead of one per
    reply, every reply complete and correct."""
    data = os.urandom(SIZE)
    st, img = file_server(disk_dir, data=data)
    with st:
        c = RawClient(st.connect()).connect()
        counter = _count_sends(st)
        n = 12  # fewer than MAX_NBD_REQUESTS: all of them are received at once
        c.s.sendall(b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, h,
                                         h * 8192, 4096) for h in range(n)))
        got = {}
        for _ in range(n):
            err, h, d = c.simple_reply(4096)
            assert err == 0
            got[h] = d
        assert got == {h: data[h * 8192:h * 8192 + 4096] for h in range(n)}
        sends = st.call(lambda: counter.sendmsg_calls)
        # One burst, one write; two if the burst was split on the way in.
        assert 1 <= sends <= 2, f"{sends} sendmsg calls for {n} pipelined replies"
        c.request(NBD_CMD_DISC)
        c.s.close()


def test_corked_replies_are_sent_when_the_burst_stalls(disk_dir: Path) -> None:
    """Two reads followed by a write whose payload has not fully arrived:
    the reads' replies were corked behind the write, which now waits for the
    client -- they must still be sent (the client waits for them before it
    sends the rest of the payload)."""
    data = os.urandom(SIZE)
    st, img = file_server(disk_dir, data=data)
    with st:
        c = RawClient(st.connect()).connect()
        payload = os.urandom(4096)
        reads = b"".join(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_READ, h,
                                     h * 4096, 4096) for h in (1, 2))
        write_hdr = struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 0, NBD_CMD_WRITE, 3,
                                65536, 4096)
        c.s.sendall(reads + write_hdr + payload[:1000])
        got = {}
        for _ in range(2):
            err, h, d = c.simple_reply(4096)  # times out if they stay corked
            assert err == 0
            got[h] = d
        assert got == {1: data[4096:8192], 2: data[8192:12288]}
        c.s.sendall(payload[1000:])
        assert c.simple_reply() == (0, 3, b"")
        assert c.read(65536, 4096, handle=4) == (0, payload)
        c.request(NBD_CMD_DISC)
        c.s.close()


def test_max_connections_and_not_persistent(disk_dir: Path) -> None:
    st, _ = file_server(disk_dir, max_connections=1, persistent=False)
    with st:
        a = RawClient(st.connect()).connect()
        b = st.connect()  # queued in the backlog: not accepted while `a` lives
        b.settimeout(0.3)
        with pytest.raises(socket.timeout):
            b.recv(1)
        a.request(NBD_CMD_DISC)
        a.s.close()
        # The last negotiated client left: the server finishes on its own.
        st.thread.join(TIMEOUT)
        assert not st.thread.is_alive()
        assert st.server is not None and st.server.finished
        b.close()


# --------------------------------------------------------------------------
# Real clients: qemu-io, qemu-img, nbdinfo, nbdcopy


def test_qemu_io_patterns(disk_dir: Path) -> None:
    need("qemu-io")
    st, img = file_server(disk_dir)
    with st:
        cmds = ["write -P 0xab 0 1M", "read -P 0xab 0 1M", "write -f -P 0x12 1M 64k",
                "read -P 0x12 1M 64k", "write -z 2M 512k", "read -P 0 2M 512k",
                "aio_write -P 1 3M 4k", "aio_write -P 2 3148k 4k", "aio_flush",
                "read -P 1 3M 4k", "read -P 2 3148k 4k", "discard 0 64k", "flush",
                "write -P 0x33 1000 333", "read -P 0x33 1000 333"]
        args = ["qemu-io", "-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        r = run(args + [st.uri()])
        assert r.returncode == 0, r.stderr
        assert "Pattern verification failed" not in r.stdout + r.stderr
        assert "error" not in r.stdout.lower(), r.stdout
    data = img.read_bytes()
    assert data[1 << 20:(1 << 20) + 65536] == b"\x12" * 65536
    assert data[2 << 20:(2 << 20) + 512 * 1024] == bytes(512 * 1024)


def test_qemu_img_convert_and_compare(disk_dir: Path) -> None:
    need("qemu-img")
    src = disk_dir / "src.img"
    src.write_bytes(os.urandom(SIZE))
    st, img = file_server(disk_dir, unix=False)
    with st:
        r = run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), st.uri()])
        assert r.returncode == 0, r.stderr
        out = disk_dir / "out.img"
        r = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", st.uri(), str(out)])
        assert r.returncode == 0, r.stderr
        r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), st.uri()])
        assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes() == src.read_bytes() == img.read_bytes()


def test_nbdcopy_roundtrip(disk_dir: Path) -> None:
    need("nbdcopy")
    src = disk_dir / "src.img"
    src.write_bytes(os.urandom(SIZE))
    st, img = file_server(disk_dir)
    with st:
        r = run(["nbdcopy", str(src), st.uri()])
        assert r.returncode == 0, r.stderr
        out = disk_dir / "out.img"
        r = run(["nbdcopy", st.uri(), str(out)])
        assert r.returncode == 0, r.stderr
    assert out.read_bytes() == src.read_bytes() == img.read_bytes()


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_fio_nbd_engine_writes_and_verifies(disk_dir: Path, unix: bool) -> None:
    """fio's nbd engine (libnbd) as the client: random 4 KiB writes at queue
    depth 16, then fio reads every block back and checks its crc32c header;
    the file behind the server holds what fio wrote."""
    need("fio")
    st, img = file_server(disk_dir, unix=unix)
    with st:
        r = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={st.uri()}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={SIZE}",
                 "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
                 "--output-format=json"], timeout=120, cwd=disk_dir)  # fio leaves state files
        assert r.returncode == 0, r.stdout + r.stderr
        job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == SIZE
        assert job["read"]["io_bytes"] == SIZE  # the verify pass read everything back
    # fio's verify header starts every block it wrote with its magic.
    raw = img.read_bytes()
    assert all(raw[off:off + 2] == b"\xca\xac" for off in range(0, SIZE, 4096))


def test_nbdinfo_json(disk_dir: Path) -> None:
    need("nbdinfo")
    st, _ = file_server(disk_dir, name="disk0", description="test disk")
    with st:
        r = run(["nbdinfo", "--json", st.uri("disk0")])
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
        e = info["exports"][0]
        assert e["export-name"] == "disk0" and e["description"] == "test disk"
        assert e["export-size"] == SIZE
        assert e["contexts"] == ["base:allocation"]
        assert (e["is_read_only"], e["can_flush"], e["can_fua"], e["can_trim"], e["can_zero"],
                e["can_fast_zero"], e["can_df"], e["can_multi_conn"], e["can_cache"]) == \
            (False, True, True, True, True, True, True, True, False)
        assert (e["block_size_minimum"], e["block_size_preferred"]) == (1, 4096)
        r = run(["nbdinfo", "--list", "--json", st.uri()])
        assert r.returncode == 0, r.stderr
        assert [x["export-name"] for x in json.loads(r.stdout)["exports"]] == ["disk0"]
        r = run(["nbdinfo", "--map", st.uri("disk0")])
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == ["0", str(SIZE), "0", "data"]


def test_clients_killed_mid_transfer(disk_dir: Path) -> None:
    need("qemu-img")
    src = disk_dir / "src.img"
    src.write_bytes(os.urandom(SIZE))
    st, img = file_server(disk_dir, unix=False)
    with st:
        for _ in range(3):
            p = subprocess.Popen(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                                  "-W", "-m", "16", str(src), st.uri()],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.05)
            p.kill()
            p.wait(TIMEOUT)
        # Raw clients that vanish with requests in flight.
        for _ in range(3):
            c = RawClient(st.connect()).connect()
            for h in range(30):
                c.request(NBD_CMD_READ, h * 65536, 65536, handle=h)
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.s.close()  # RST
        c = RawClient(st.connect()).connect()
        assert c.write(0, b"\x77" * 4096) == 0
        assert c.read(0, 4096) == (0, b"\x77" * 4096)
        c.s.close()
        deadline = time.monotonic() + TIMEOUT
        while st.call(lambda: len(st.server.clients)) and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        assert st.call(lambda: len(st.server.clients)) == 0  # type: ignore[union-attr]


# --------------------------------------------------------------------------
# libnbd at the protocol level, with nbdkit as the reference

LIBNBD_SCRIPT = r"""
import json, sys, errno
import nbd
uri = sys.argv[1]
out = {}
h = nbd.NBD()
h.set_opt_mode(True)
h.add_meta_context("base:allocation")
h.connect_uri(uri)
out["structured"] = h.get_structured_replies_negotiated()
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
out["list"] = names
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
out["meta"] = ctxs
h.opt_info()
out["info_size"] = h.get_size()
try:
    h.set_export_name("no-such-export")
    h.opt_info()
    out["unknown_export"] = "accepted"
except nbd.Error as e:
    out["unknown_export"] = "refused"
h.set_export_name(sys.argv[2])
h.opt_go()
size = h.get_size()
out["size"] = size
out["flags"] = dict(can_flush=h.can_flush(), can_fua=h.can_fua(), can_trim=h.can_trim(),
                    can_zero=h.can_zero(), can_fast_zero=h.can_fast_zero(), can_df=h.can_df(),
                    is_read_only=h.is_read_only(),
                    can_meta=h.can_meta_context("base:allocation"))
# Many requests in flight: 64 writes, then 64 reads, all asynchronous.
def wait_all(cookies):
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c in cookies:
        assert h.aio_command_completed(c)
bufs = [nbd.Buffer.from_bytearray(bytearray([i]) * 4096) for i in range(64)]
cookies = [h.aio_pwrite(bufs[i], i * 8192, flags=nbd.CMD_FLAG_FUA if i % 8 == 0 else 0)
           for i in range(64)]
out["max_in_flight"] = h.aio_in_flight()
wait_all(cookies)
rbufs = [nbd.Buffer(4096) for _ in range(64)]
cookies = [h.aio_pread(rbufs[i], i * 8192) for i in range(64)]
wait_all(cookies)
out["async_ok"] = all(bytes(rbufs[i].to_bytearray()) == bytes([i]) * 4096 for i in range(64))
h.flush()
h.zero(65536, 1 << 20, flags=nbd.CMD_FLAG_NO_HOLE)
h.zero(2 << 20, 65536, flags=nbd.CMD_FLAG_FAST_ZERO) if h.can_fast_zero() else None
out["zero_ok"] = h.pread(4096, 65536 + 4096) == bytes(4096)
h.trim(65536, 3 << 20)
h.pwrite(b"\x5a" * 512, 512, flags=nbd.CMD_FLAG_FUA)
chunks = []
got = h.pread_structured(512, 512, lambda sub, off, st, err: chunks.append(st) or 0,
                         flags=nbd.CMD_FLAG_DF)
out["pwrite_ok"] = got == b"\x5a" * 512 and chunks == [nbd.READ_DATA]
ext = []
h.block_status(size, 0, lambda meta, off, entries, err: ext.append((meta, list(entries))) or 0)
out["extents_cover"] = sum(e[1][0::2][0] for e in ext[:1]) > 0 and ext[0][0] == "base:allocation"
# Requests the client library would refuse: turn its checks off.
h.set_strict_mode(0)
def err_of(fn):
    try:
        fn()
        return 0
    except nbd.Error as e:
        return errno.errorcode.get(e.errno, e.errno)
out["read_past_end"] = err_of(lambda: h.pread(1024, size - 512))
out["write_past_end"] = err_of(lambda: h.pwrite(b"x" * 1024, size - 512))
out["bad_flag"] = err_of(lambda: h.pread(512, 0, flags=1 << 9))
out["still_works"] = h.pread(512, 512) == b"\x5a" * 512
h.shutdown()
print(json.dumps(out))
"""


def _libnbd(uri: str, name: str = "") -> dict:
    r = run(["/usr/bin/python3", "-c", LIBNBD_SCRIPT, uri, name], timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_libnbd_protocol_vs_nbdkit(disk_dir: Path) -> None:
    need_libnbd()
    st, _ = file_server(disk_dir, data=bytes(SIZE))
    with st:
        ours = _libnbd(st.uri())
    assert ours["structured"] and ours["list"] == [""] and ours["meta"] == ["base:allocation"]
    assert ours["unknown_export"] == "refused"
    assert ours["size"] == ours["info_size"] == SIZE
    assert ours["flags"] == dict(can_flush=True, can_fua=True, can_trim=True, can_zero=True,
                                 can_fast_zero=True, can_df=True, is_read_only=False,
                                 can_meta=True)
    assert ours["max_in_flight"] > 16
    for k in ("async_ok", "zero_ok", "pwrite_ok", "extents_cover", "still_works"):
        assert ours[k] is True, k
    assert ours["read_past_end"] == "EINVAL"
    assert ours["write_past_end"] == "ENOSPC"
    assert ours["bad_flag"] == "EINVAL"
    if not have("nbdkit"):
        pytest.skip("nbdkit is not installed (no differential check)")
    sock = str(disk_dir / "kit.sock")
    p = subprocess.Popen(["nbdkit", "-f", "-U", sock, "memory", str(SIZE)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        theirs = _libnbd(f"nbd+unix:///?socket={sock}")
    finally:
        p.terminate()
        p.wait(TIMEOUT)
        p.stderr.close()  # type: ignore[union-attr]
    # Same observable behaviour where both implement it (nbdkit's memory
    # plugin serves any export name, lists its own meta contexts and makes its
    # own error choice for writes past the end).
    for k in ("structured", "list", "size", "async_ok", "zero_ok",
              "pwrite_ok", "extents_cover", "still_works", "read_past_end", "bad_flag"):
        assert ours[k] == theirs[k], (k, ours[k], theirs[k])
    for k in ("can_flush", "can_fua", "can_trim", "can_zero", "can_df", "is_read_only", "can_meta"):
        assert ours["flags"][k] == theirs["flags"][k], k


# --------------------------------------------------------------------------
# The CLI


def _cli(args: list, **kw: Any) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-m", "pyaioctx", "nbd", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kw)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_tcp_and_signal_shutdown(disk_dir: Path, sig: int) -> None:
    img = disk_dir / "cli.img"
    make_image(img)
    p = _cli(["-p", "0", "-t", "-e", "2", "-x", "vol", "--print-uri", "--cache", "writeback",
              "--discard", "unmap", str(img)])
    try:
        uri = p.stdout.readline().strip()  # type: ignore[union-attr]
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/vol"), uri
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        c = RawClient(s).connect("vol")
        assert c.flags & NBD_FLAG_CAN_MULTI_CONN
        assert c.write(8192, b"\x42" * 4096) == 0  # acknowledged: must survive
        # A client that is still connected does not stop the shutdown.
        p.send_signal(sig)
        assert p.wait(TIMEOUT) == 0, p.stderr.read()  # type: ignore[union-attr]
        assert is_closed(s)
        s.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    assert img.read_bytes()[8192:12288] == b"\x42" * 4096


_TGKILL = {"x86_64": 234, "aarch64": 131}


def test_cli_shutdown_when_the_signal_hits_a_worker_thread(disk_dir: Path) -> None:
    """SIGTERM delivered to a thread-pool worker, not the main thread, still
    stops the server at once (the main thread is blocked in epoll_wait and
    is woken through the signal wake-up fd)."""
    import ctypes
    import platform

    nr = _TGKILL.get(platform.machine())
    if nr is None:
        pytest.skip(f"tgkill syscall number unknown on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    img = disk_dir / "cli.img"
    make_image(img)
    p = _cli(["-p", "0", "-t", "-x", "vol", "--print-uri", "--aio", "threads", str(img)])
    try:
        uri = p.stdout.readline().strip()  # type: ignore[union-attr]
        port = int(uri.rsplit(":", 1)[1].split("/")[0])
        s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        c = RawClient(s).connect("vol")
        assert c.write(0, b"\x17" * 4096) == 0  # starts pool workers
        tids = [int(t) for t in os.listdir(f"/proc/{p.pid}/task") if int(t) != p.pid]
        assert tids, "no worker thread to signal"
        time.sleep(0.2)  # let the main thread block in epoll_wait
        assert libc.syscall(nr, p.pid, tids[0], int(signal.SIGTERM)) == 0
        assert p.wait(TIMEOUT) == 0, p.stderr.read()  # type: ignore[union-attr]
        s.close()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    assert img.read_bytes()[:4096] == b"\x17" * 4096


def test_cli_unix_not_persistent(disk_dir: Path) -> None:
    img = disk_dir / "cli.img"
    make_image(img)
    sock = disk_dir / "cli.sock"
    pid = disk_dir / "pid"
    p = _cli(["-k", str(sock), "-r", "-f", "raw", "--print-uri", "--pid-file", str(pid),
              "-v", str(img)])
    try:
        uri = p.stdout.readline().strip()  # type: ignore[union-attr]
        assert uri == f"nbd+unix:///?socket={sock}"
        assert int(pid.read_text()) == p.pid
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(TIMEOUT)
        s.connect(str(sock))
        c = RawClient(s).connect()
        assert c.flags & NBD_FLAG_READ_ONLY and not c.flags & NBD_FLAG_CAN_MULTI_CONN
        assert c.write(0, b"x" * 512) == NBD_EPERM
        assert c.read(0, 256) == (0, make_image(disk_dir / "ref", 256))
        c.request(NBD_CMD_DISC)
        s.close()
        # Without -t the server exits when its client has gone.
        assert p.wait(TIMEOUT) == 0
        err = p.stderr.read()  # type: ignore[union-attr]
        assert "connected to export" in err and "disconnected" in err
        assert not sock.exists() and not pid.exists()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]


def test_cli_image_opts_and_errors(disk_dir: Path) -> None:
    need("qemu-io")
    img = disk_dir / "o.img"
    make_image(img)
    sock = disk_dir / "o.sock"
    p = _cli(["-k", str(sock), "--print-uri", "--image-opts",
              f"driver=raw,file.driver=file,file.filename={img},cache.direct=off"])
    try:
        uri = p.stdout.readline().strip()  # type: ignore[union-attr]
        r = run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k", uri])
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        assert p.wait(TIMEOUT) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    for args, msg in ((["-f", "qcow2", str(img)], "Unknown file format"),
                      ([str(disk_dir / "missing.img")], "missing.img"),
                      (["-k", str(sock), "-p", "1", str(img)], "cannot be combined"),
                      (["--cache", "bogus", str(img)], "cache mode")):
        p = _cli(args)
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 1 and msg in err, (args, err)


# --------------------------------------------------------------------------
# base:allocation from the block layer's block status

def _sparse_image(path: Path) -> bytes:
    """4 MiB: data at [64k, 128k) and [2M, 2M+8k), holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.seek(65536)
        f.write(b"\x11" * 65536)
        f.seek(2 << 20)
        f.write(b"\x22" * 8192)
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.lseek(fd, 0, os.SEEK_DATA) != 65536:
            pytest.skip("this file system does not report holes through SEEK_DATA")
    except OSError:
        pytest.skip("this file system does not report holes through SEEK_DATA")
    finally:
        os.close(fd)
    return path.read_bytes()


_SPARSE_MAP = [(0, 65536, 3), (65536, 65536, 0), (131072, (2 << 20) - 131072, 3),
               (2 << 20, 8192, 0), ((2 << 20) + 8192, SIZE - (2 << 20) - 8192, 3)]


def _sparse_server(disk_dir: Path, **kw: Any) -> tuple[ServerThread, bytes]:
    img = disk_dir / "sparse.img"
    data = _sparse_image(img)
    st = ServerThread(lambda: bdrv_open(str(img), {"driver": "file"}, BDRV_O_RDWR),
                      unix=str(disk_dir / "nbd.sock"), **kw)
    return st, data


def test_nbdinfo_map_sees_holes(disk_dir: Path) -> None:
    """Holes of a sparse file are NBD_STATE_HOLE|NBD_STATE_ZERO, data is 0."""
    need("nbdinfo")
    st, _ = _sparse_server(disk_dir)
    with st:
        r = run(["nbdinfo", "--map", st.uri()])
        assert r.returncode == 0, r.stderr
        got = [tuple(int(x) for x in line.split()[:3]) for line in r.stdout.splitlines()]
        assert got == _SPARSE_MAP


def test_nbdcopy_keeps_holes(disk_dir: Path) -> None:
    """nbdcopy asks for block status and skips the holes: the copy is equal
    and sparse."""
    need("nbdcopy")
    st, data = _sparse_server(disk_dir)
    out = disk_dir / "out.img"
    with st:
        r = run(["nbdcopy", st.uri(), str(out)])
        assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data
    assert os.stat(out).st_blocks * 512 < SIZE // 2


LIBNBD_STATUS_SCRIPT = r"""
import json, sys
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
out = {}
def cb(key):
    def f(meta, off, entries, err):
        out.setdefault(key, []).append((meta, list(entries)))
        return 0
    return f
h.block_status(h.get_size(), 0, cb("all"))
h.block_status(h.get_size(), 0, cb("one"), nbd.CMD_FLAG_REQ_ONE)
h.block_status(4096, 70000, cb("mid"))
h.shutdown()
print(json.dumps(out))
"""


def test_block_status_extents_libnbd(disk_dir: Path) -> None:
    """Extents cover the request exactly, equal neighbours merge, REQ_ONE
    gets one extent, a range inside one extent gets just that range."""
    need_libnbd()
    st, _ = _sparse_server(disk_dir)
    with st:
        r = run(["/usr/bin/python3", "-c", LIBNBD_STATUS_SCRIPT, st.uri()])
        assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    flat = [x for _, pnum, flags in _SPARSE_MAP for x in (pnum, flags)]
    assert out["all"] == [["base:allocation", flat]]
    assert out["one"] == [["base:allocation", [65536, 3]]]
    assert out["mid"] == [["base:allocation", [4096, 0]]]
