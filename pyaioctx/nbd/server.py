# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD server: port of QEMU's nbd/server.c (and the serving loop of qemu-nbd.c).

Everything runs on one AioContext, as in QEMU:

* Listening sockets and client sockets are non-blocking and watched through
  fd handlers (``aio_set_fd_handler``).  A coroutine that would block on a
  socket registers interest and yields; the fd handler wakes it with
  ``aio_co_wake`` -- QEMU's ``qio_channel_yield`` / ``qio_channel_restart_read``.
* The handshake of each client runs in one coroutine (``nbd_co_client_start``).
* In transmission, each request gets its own coroutine (``nbd_trip``): it
  receives a request, immediately starts the coroutine that receives the next
  one (``nbd_client_receive_next_request``), runs the request through the
  block layer and sends its reply.  Up to ``MAX_NBD_REQUESTS`` requests per
  client are in flight, and replies leave in completion order.  Replies are
  serialised by a per-client CoMutex (``send_lock``) so that the bytes of two
  replies never interleave.
* Clean shutdown (``NBDServer.close``) stops listening, shuts every client
  socket down, waits for the requests in flight, then drains and flushes each
  exported device (qemu-nbd's SIGTERM path).

Deviations from QEMU, on purpose:

* No TLS (``NBD_OPT_STARTTLS`` is answered "unsupported") and no extended
  headers; ``NBD_CMD_CACHE`` is not advertised.
* The reader is buffered: one ``recv`` may bring several request headers,
  which saves a syscall per request when a client pipelines.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import Any, Callable, Optional, Union

from ..aio import (
    AioContext,
    aio_bh_new,
    aio_notify,
    aio_set_fd_handler,
    aio_timer_new,
    aio_wait_while,
    qemu_bh_delete,
    qemu_bh_schedule,
    qemu_get_current_aio_context,
)
from ..timer import QEMU_CLOCK_REALTIME, SCALE_MS, qemu_clock_get_ms, timer_del, timer_free, timer_mod
from ..coroutine import (
    CoMutex,
    aio_co_enter,
    aio_co_wake,
    qemu_co_mutex_lock,
    qemu_co_mutex_unlock,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_self,
    qemu_coroutine_yield,
)
from ..iov import QEMUIOVector, qemu_iovec_init_buf
from ..block import (
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BDRV_REQUEST_MAX_BYTES,
    BlockDriverState,
    bdrv_co_block_status,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
    bdrv_drain,
    bdrv_flush,
    bdrv_get_aio_context,
    bdrv_getlength,
    bdrv_is_read_only,
    bdrv_try_change_aio_context,
    qemu_blockalign,
)
from .protocol import *  # noqa: F401,F403
from .protocol import (
    NBDRequest,
    OPTION_HEADER,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    nbd_cmd_lookup,
    nbd_err_lookup,
    nbd_opt_lookup,
    nbd_rep_lookup,
    system_errno_to_nbd_errno,
)

__all__ = ["NBDExport", "NBDServer", "NBDClient", "MAX_NBD_REQUESTS", "NBDDisconnect"]

log = logging.getLogger("pyaioctx.nbd")

# Requests in flight per client (QEMU's MAX_NBD_REQUESTS).
MAX_NBD_REQUESTS = 16
# Seconds a client may take for the handshake before it is dropped (the
# default of qemu-nbd's --handshake-limit in later QEMU versions).
HANDSHAKE_LIMIT_S = 10.0
# Read-ahead buffer per client: enough for a burst of pipelined headers and
# small writes.
_RBUF_SIZE = 256 * 1024
# Buffers up to this size are recycled instead of being mapped per request.
_POOL_MAX_SIZE = 4 * 1024 * 1024
_POOL_PER_CLASS = 64
# Replies held back while more requests are already buffered (see
# NBDClient._co_send_locked): at most this many bytes and pieces, so that
# one sendmsg carries them (IOV_MAX is 1024) and memory stays bounded.
_CORK_MAX_BYTES = 256 * 1024
_CORK_MAX_PIECES = 256

_GREETING = struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC,
                        NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
_ZEROES_124 = bytes(124)
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64_U16 = struct.Struct(">QH")
_U32_U32 = struct.Struct(">II")
_OFFSET = struct.Struct(">Q")
_ERROR_CHUNK = struct.Struct(">IH")
# A structured reply's header followed by the OFFSET_DATA chunk's offset.
_OFFSET_DATA_CHUNK = struct.Struct(">IHHQIQ")

# Extents in one BLOCK_STATUS reply (QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS:
# 1 MiB of 8-byte descriptors).
NBD_MAX_BLOCK_STATUS_EXTENTS = (1 << 20) // 8

# Result of receiving a request that is NBD_CMD_DISC (a clean disconnect).
_DISC = 1
_REQUEST_SIZE = REQUEST.size
_REQUEST_UNPACK_FROM = REQUEST.unpack_from


class NBDDisconnect(Exception):
    """The connection is gone or must be dropped (EOF, socket error, a
    protocol violation after which the stream cannot be resynchronised)."""


# --------------------------------------------------------------------------
# Moving a device to another context

def _bdrv_set_aio_context(bs: BlockDriverState, ctx: AioContext) -> None:
    """Move ``bs`` (and the nodes connected to it) into ``ctx`` with
    ``bdrv_try_change_aio_context``, as QEMU's ``block-export-add
    iothread=...`` does before serving a node; raises OSError when the
    block layer refuses."""
    ret = bdrv_try_change_aio_context(bs, ctx)
    if ret < 0:
        raise OSError(-ret, f"Cannot change the AioContext of {bs!r}: {os.strerror(-ret)}",
                      bs.filename)


# --------------------------------------------------------------------------
# Exports

class NBDExport:
    """QEMU's ``NBDExport``: one device offered under one name.

    ``bs``           the BlockDriverState served
    ``name``         export name ("" is qemu-nbd's default)
    ``description``  sent as NBD_INFO_DESCRIPTION when set
    ``readonly``     refuse writes (forced when the device is read-only)
    ``writethrough`` every write is FUA (QEMU's cache=writethrough/directsync)
    ``multi_conn``   advertise NBD_FLAG_CAN_MULTI_CONN.  True here whenever
                     several clients may connect: they all share one device
                     in one process, so a flush on any connection covers the
                     writes completed on all of them.
    ``size``         device length at export time
    ``nbdflags``     transmission flags (without SEND_DF, added per client)
    """

    def __init__(self, bs: BlockDriverState, name: str = "", description: Optional[str] = None,
                 readonly: bool = False, writethrough: bool = False,
                 multi_conn: bool = True) -> None:
        if not isinstance(bs, BlockDriverState):
            raise TypeError(f"NBDExport: expected a BlockDriverState, got {type(bs).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"NBDExport: export name must be a str, got {type(name).__name__}")
        if len(name.encode()) > NBD_MAX_STRING_SIZE:
            raise ValueError(f"NBDExport: export name longer than {NBD_MAX_STRING_SIZE} bytes")
        if description is not None and len(description.encode()) > NBD_MAX_STRING_SIZE:
            raise ValueError(f"NBDExport: description longer than {NBD_MAX_STRING_SIZE} bytes")
        size = bdrv_getlength(bs)
        if size < 0:
            raise OSError(-size, f"NBDExport: cannot get the length of {bs!r}: {os.strerror(-size)}")
        self.bs = bs
        self.name = name
        self.description = description
        self.readonly = bool(readonly) or bdrv_is_read_only(bs)
        self.writethrough = bool(writethrough)
        self.multi_conn = bool(multi_conn)
        self.size = size
        # Port of nbd_export_create's flag computation.
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA
        if self.readonly:
            flags |= NBD_FLAG_READ_ONLY
        else:
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        if self.multi_conn:
            flags |= NBD_FLAG_CAN_MULTI_CONN
        self.nbdflags = flags
        self.request_alignment = max(1, bs.bl.request_alignment)
        mt = bs.bl.max_transfer or NBD_MAX_BUFFER_SIZE
        self.max_transfer = min(mt, NBD_MAX_BUFFER_SIZE)

    def __repr__(self) -> str:
        return (f"<NBDExport {self.name!r} size={self.size}"
                f"{' ro' if self.readonly else ''} flags={self.nbdflags:#x}>")


def _drop_sent(bufs: list, n: int) -> list:
    """The pieces of ``bufs`` left after its first ``n`` bytes went out
    (empty pieces, which sendmsg never reports, are dropped too: an option
    reply without payload)."""
    out = []
    for b in bufs:
        ln = b.nbytes if b.__class__ is memoryview else len(b)
        if n >= ln:
            n -= ln
        elif n:
            out.append(memoryview(b)[n:])
            n = 0
        else:
            out.append(b)
    return out


# --------------------------------------------------------------------------
# Buffer pool

class _BufferPool:
    """Aligned request buffers, recycled by power-of-two size class.

    Each ``qemu_blockalign`` maps fresh memory (two syscalls); at tens of
    thousands of requests a second that is measurable, so buffers of up to
    4 MiB are kept per size class.  A pooled buffer keeps its byte view and
    a one-entry QEMUIOVector over it, so a request of exactly the class
    size (the common 4 KiB read) builds neither.  Home thread only.

    ``get`` returns ``(entry, view, qiov)``: ``entry`` goes back to ``put``
    with ``view``; ``qiov`` is None when the request is shorter than its
    buffer (the caller builds one over ``view``).
    """

    def __init__(self, align: int) -> None:
        self.align = max(align, 4096)
        self.free: dict[int, list] = {}

    def get(self, bs: BlockDriverState, size: int) -> tuple[tuple, memoryview, Optional[QEMUIOVector]]:
        if size > _POOL_MAX_SIZE:
            buf = qemu_blockalign(bs, max(size, 1))
            view = memoryview(buf).cast("B")[:size]
            return (buf, view, None), view, None
        cls = 4096
        while cls < size:
            cls <<= 1
        lst = self.free.get(cls)
        if lst:
            entry = lst.pop()
        else:
            buf = qemu_blockalign(bs, cls)
            view = memoryview(buf).cast("B")
            qiov = QEMUIOVector()
            qemu_iovec_init_buf(qiov, view)
            entry = (buf, view, qiov)
        if size == cls:
            return entry, entry[1], entry[2]
        return entry, entry[1][:size], None

    def put(self, entry: tuple, view: memoryview) -> None:
        buf, full, qiov = entry
        if qiov is None or view is not full:
            # A slice made for one request (or an unpooled buffer's view).
            try:
                view.release()
            except BufferError:
                pass
            if qiov is None:
                return
        lst = self.free.setdefault(len(buf), [])
        if len(lst) < _POOL_PER_CLASS:
            lst.append(entry)


# --------------------------------------------------------------------------
# Clients

class _Req:
    """QEMU's ``NBDRequestData``: a request and its payload buffer."""

    __slots__ = ("request", "buf", "data", "qiov", "complete")

    def __init__(self) -> None:
        self.request: Optional[NBDRequest] = None
        self.buf: Any = None  # the buffer pool's entry
        self.data: Optional[memoryview] = None
        self.qiov: Optional[QEMUIOVector] = None  # over data, if the pool had one
        self.complete = False


class NBDClient:
    """QEMU's ``NBDClient``: one connection, from handshake to close.

    Home thread of the server's context only.  ``refcount`` is held by the
    open connection, the handshake coroutine and every request coroutine;
    the socket is closed when it reaches zero (``nbd_client_put``).
    """

    def __init__(self, server: "NBDServer", sock: socket.socket, peer: str) -> None:
        self.server = server
        self.ctx = server.ctx
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.exp: Optional[NBDExport] = None
        self.refcount = 1
        self.closing = False
        self.negotiated = False
        self.structured_reply = False
        self.no_zeroes = False
        self.base_allocation = False
        self.meta_export: Optional[str] = None
        self.send_lock = CoMutex()
        self.recv_coroutine: Any = None
        self.nb_requests = 0
        self.opt = 0
        # Buffered reader state.
        self._rbuf = bytearray(_RBUF_SIZE)
        self._rview = memoryview(self._rbuf)
        self._rpos = 0
        self._rend = 0
        # fd-handler state: the coroutines waiting for the socket, and what
        # is registered right now (kept registered while busy, dropped
        # lazily when it fires with nobody waiting).
        self._read_co: Any = None
        self._write_co: Any = None
        self._reg_read = False
        self._reg_write = False
        self._handshake_timer: Any = None
        # Corked replies (pieces, their byte count, and the request buffers
        # to recycle once sent) and the BH that sends them if no later reply
        # does; home thread only, changed only while send_lock is free.
        self._cork: list = []
        self._cork_bytes = 0
        self._cork_release: list = []
        self._flush_bh = aio_bh_new(self.ctx, self._flush_cb, None)

    def __repr__(self) -> str:
        return f"<NBDClient {self.peer} requests={self.nb_requests}{' closing' if self.closing else ''}>"

    # -- reference counting (nbd_client_get / nbd_client_put) ---------------
    def _ref(self) -> None:
        self.refcount += 1

    def _unref(self) -> None:
        self.refcount -= 1
        if self.refcount == 0:
            self._finalize()

    def _finalize(self) -> None:
        qemu_bh_delete(self._flush_bh)
        self._cork.clear()
        self._release_corked()
        if self._handshake_timer is not None:
            timer_del(self._handshake_timer)
            timer_free(self._handshake_timer)
            self._handshake_timer = None
        if self._reg_read or self._reg_write:
            aio_set_fd_handler(self.ctx, self.fd, True, None, None, None, None, None)
            self._reg_read = self._reg_write = False
        try:
            self.sock.close()
        except OSError:
            pass
        self._rview.release()
        self.server._client_gone(self)

    def close(self, negotiated: Optional[bool] = None) -> None:
        """Port of ``client_close``: shut the socket down, so every coroutine
        waiting on it wakes up and fails, and drop the connection's reference.
        Safe to call more than once."""
        if self.closing:
            return
        self.closing = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # Coroutines waiting on the socket see EOF/EPIPE from the fd handlers
        # (the shutdown makes the socket readable and writable); make sure
        # the handlers are registered for them.
        self._update_handlers()
        self.server._client_closed(self, self.negotiated if negotiated is None else negotiated)
        self._unref()

    # -- socket I/O (qio_channel_*_all with qio_channel_yield) ---------------
    def _update_handlers(self) -> None:
        want_r = self._read_co is not None
        want_w = self._write_co is not None
        # Keep the read side registered while registered: a busy client
        # would otherwise pay two epoll_ctl calls per request.
        want_r = want_r or self._reg_read
        if want_r == self._reg_read and want_w == self._reg_write:
            return
        self._reg_read, self._reg_write = want_r, want_w
        aio_set_fd_handler(self.ctx, self.fd, True,
                           self._on_readable if want_r else None,
                           self._on_writable if want_w else None,
                           None, None, None)

    def _on_readable(self, _: Any) -> None:
        co = self._read_co
        if co is None:
            # Nobody waits (the request limit is reached, or the reader is
            # busy): stop watching, or the level-triggered fd would spin.
            self._reg_read = False
            aio_set_fd_handler(self.ctx, self.fd, True, None,
                               self._on_writable if self._reg_write else None,
                               None, None, None)
            return
        self._read_co = None
        aio_co_wake(co)

    def _on_writable(self, _: Any) -> None:
        co = self._write_co
        self._write_co = None
        self._reg_write = False
        aio_set_fd_handler(self.ctx, self.fd, True,
                           self._on_readable if self._reg_read else None,
                           None, None, None, None)
        if co is not None:
            aio_co_wake(co)

    def _wait_readable(self) -> None:
        self._read_co = qemu_coroutine_self()
        self._update_handlers()
        qemu_coroutine_yield()

    def _wait_writable(self) -> None:
        self._write_co = qemu_coroutine_self()
        self._update_handlers()
        qemu_coroutine_yield()

    def _fill(self) -> None:
        """Read more bytes into the read-ahead buffer (at least one)."""
        if self._rpos == self._rend:
            self._rpos = self._rend = 0
        elif self._rend == len(self._rbuf):
            n = self._rend - self._rpos
            self._rbuf[:n] = self._rbuf[self._rpos:self._rend]
            self._rpos, self._rend = 0, n
        while True:
            try:
                n = self.sock.recv_into(self._rview[self._rend:])
            except BlockingIOError:
                self._wait_readable()
                continue
            except InterruptedError:
                continue
            except OSError as e:
                raise NBDDisconnect(f"read failed: {e.strerror or e}") from None
            if n == 0:
                raise NBDDisconnect("unexpected end-of-file")
            self._rend += n
            return

    def _co_read(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (``nbd_read``)."""
        if self._rend - self._rpos >= n:
            p = self._rpos
            self._rpos = p + n
            return bytes(self._rview[p:p + n])
        if n > len(self._rbuf) // 2:
            out = bytearray(n)
            self._co_read_into(memoryview(out))
            return bytes(out)
        if self._rpos and len(self._rbuf) - self._rpos < n:
            m = self._rend - self._rpos
            self._rbuf[:m] = self._rbuf[self._rpos:self._rend]
            self._rpos, self._rend = 0, m
        while self._rend - self._rpos < n:
            self._fill()
        p = self._rpos
        self._rpos = p + n
        return bytes(self._rview[p:p + n])

    def _co_read_into(self, mv: memoryview) -> None:
        """Fill ``mv`` exactly: buffered bytes first, then straight from the
        socket (payloads do not go through the read-ahead buffer)."""
        want = len(mv)
        have = min(want, self._rend - self._rpos)
        if have:
            mv[:have] = self._rview[self._rpos:self._rpos + have]
            self._rpos += have
        off = have
        while off < want:
            try:
                n = self.sock.recv_into(mv[off:])
            except BlockingIOError:
                self._wait_readable()
                continue
            except InterruptedError:
                continue
            except OSError as e:
                raise NBDDisconnect(f"read failed: {e.strerror or e}") from None
            if n == 0:
                raise NBDDisconnect("unexpected end-of-file")
            off += n

    def _co_skip(self, n: int) -> None:
        """Consume and drop ``n`` bytes (``nbd_drop``)."""
        while n > 0:
            chunk = min(n, 65536)
            self._co_read(chunk)
            n -= chunk

    def _co_write(self, bufs: list) -> None:
        """Write every byte of ``bufs`` (``qio_channel_writev_all``)."""
        sock = self.sock
        while bufs:
            try:
                n = sock.sendmsg(bufs)
            except BlockingIOError:
                self._wait_writable()
                continue
            except InterruptedError:
                continue
            except OSError as e:
                raise NBDDisconnect(f"write failed: {e.strerror or e}") from None
            bufs = _drop_sent(bufs, n)
            if bufs and self.closing:
                raise NBDDisconnect("connection closed")

    # -- handshake (nbd_negotiate*) -----------------------------------------
    def _opt_reply(self, type: int, payload: bytes = b"") -> None:
        self._co_write([OPTION_REPLY.pack(NBD_REP_MAGIC, self.opt, type, len(payload)), payload])

    def _opt_error(self, type: int, msg: str) -> None:
        """``nbd_negotiate_send_rep_err``: an error reply with a message."""
        log.info("nbd %s: option %s refused (%s): %s", self.peer, nbd_opt_lookup(self.opt),
                 nbd_rep_lookup(type), msg)
        self._opt_reply(type, msg.encode()[:NBD_MAX_STRING_SIZE])

    def _co_negotiate(self) -> None:
        """Port of ``nbd_negotiate`` / ``nbd_negotiate_options``.  Returns
        normally once transmission may start; raises NBDDisconnect when the
        connection must be dropped (including NBD_OPT_ABORT)."""
        self._co_write([_GREETING])
        try:
            (cflags,) = _U32.unpack(self._co_read(4))
        except NBDDisconnect:
            # A port probe: stay quiet.
            raise NBDDisconnect("") from None
        fixed = bool(cflags & NBD_FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & NBD_FLAG_C_NO_ZEROES)
        if cflags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES):
            raise NBDDisconnect(f"unknown client flags {cflags:#x}")
        while True:
            magic, opt, length = OPTION_HEADER.unpack(self._co_read(OPTION_HEADER.size))
            if magic != NBD_OPTS_MAGIC:
                raise NBDDisconnect(f"bad option magic {magic:#x}")
            self.opt = opt
            if length > NBD_MAX_BUFFER_SIZE:
                raise NBDDisconnect(f"option length {length} is larger than {NBD_MAX_BUFFER_SIZE}")
            if not fixed and opt != NBD_OPT_EXPORT_NAME:
                # Without fixed newstyle there is no way to refuse an option.
                raise NBDDisconnect(f"unsupported option {opt} without fixed newstyle")
            if opt == NBD_OPT_EXPORT_NAME:
                if length > NBD_MAX_STRING_SIZE:
                    raise NBDDisconnect("export name too long")
                self._handle_export_name(self._co_read(length))
                return
            data = self._co_read(length) if length else b""
            if opt == NBD_OPT_ABORT:
                # The spec asks for an ACK; the client may already be gone.
                try:
                    self._opt_reply(NBD_REP_ACK)
                except NBDDisconnect:
                    pass
                raise NBDDisconnect("")
            elif opt == NBD_OPT_LIST:
                if length:
                    self._opt_error(NBD_REP_ERR_INVALID, "list: option data is not empty")
                    continue
                for exp in self.server.exports.values():
                    nm = exp.name.encode()
                    self._opt_reply(NBD_REP_SERVER, _U32.pack(len(nm)) + nm)
                self._opt_reply(NBD_REP_ACK)
            elif opt in (NBD_OPT_INFO, NBD_OPT_GO):
                if self._handle_info(data):
                    return
            elif opt == NBD_OPT_STRUCTURED_REPLY:
                if length:
                    self._opt_error(NBD_REP_ERR_INVALID, "structured reply: option data is not empty")
                elif self.structured_reply:
                    self._opt_error(NBD_REP_ERR_INVALID, "structured reply already negotiated")
                else:
                    self._opt_reply(NBD_REP_ACK)
                    self.structured_reply = True
            elif opt in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
                self._handle_meta_context(data)
            else:
                self._opt_error(NBD_REP_ERR_UNSUP, f"unsupported option {opt} ({nbd_opt_lookup(opt)})")

    def _export_flags(self, exp: NBDExport) -> int:
        flags = exp.nbdflags
        if self.structured_reply:
            flags |= NBD_FLAG_SEND_DF
        return flags

    def _handle_export_name(self, raw: bytes) -> None:
        """Port of ``nbd_negotiate_handle_export_name``: no way to refuse
        except by closing."""
        name = raw.decode("utf-8", "replace")
        exp = self.server.exports.get(name)
        if exp is None:
            raise NBDDisconnect(f"export {name!r} not present")
        # Structured replies may not be used by a client that took the old
        # way in (QEMU resets the mode for NBD_OPT_EXPORT_NAME).
        self.structured_reply = False
        self.base_allocation = False
        payload = _U64_U16.pack(exp.size, self._export_flags(exp))
        self._co_write([payload] if self.no_zeroes else [payload, _ZEROES_124])
        self.exp = exp

    def _handle_info(self, data: bytes) -> bool:
        """Port of ``nbd_negotiate_handle_info``.  True when NBD_OPT_GO
        succeeded (transmission starts)."""
        length = len(data)
        if length < 6:
            self._opt_error(NBD_REP_ERR_INVALID, "info: option data too short")
            return False
        (namelen,) = _U32.unpack_from(data, 0)
        if namelen > length - 6:
            self._opt_error(NBD_REP_ERR_INVALID, "info: name length is incorrect")
            return False
        if namelen > NBD_MAX_STRING_SIZE:
            self._opt_error(NBD_REP_ERR_INVALID, "info: export name too long")
            return False
        name_b = data[4:4 + namelen]
        pos = 4 + namelen
        (nreq,) = _U16.unpack_from(data, pos)
        pos += 2
        if length - pos != nreq * 2:
            self._opt_error(NBD_REP_ERR_INVALID, "info: request count is incorrect")
            return False
        sendname = blocksize = False
        for i in range(nreq):
            (r,) = _U16.unpack_from(data, pos + 2 * i)
            if r == NBD_INFO_NAME:
                sendname = True
            elif r == NBD_INFO_BLOCK_SIZE:
                blocksize = True
        name = name_b.decode("utf-8", "replace")
        exp = self.server.exports.get(name)
        if exp is None:
            self._opt_error(NBD_REP_ERR_UNKNOWN, f"export {name!r} not present")
            return False
        if sendname:
            self._opt_reply(NBD_REP_INFO, _U16.pack(NBD_INFO_NAME) + name_b)
        if exp.description:
            self._opt_reply(NBD_REP_INFO, _U16.pack(NBD_INFO_DESCRIPTION) + exp.description.encode())
        # Block sizes are always sent; the minimum is only raised above 1
        # when the client promised to obey it (or only asks, NBD_OPT_INFO).
        minimum = exp.request_alignment if (self.opt == NBD_OPT_INFO or blocksize) else 1
        preferred = max(4096, minimum)
        self._opt_reply(NBD_REP_INFO, struct.pack(">HIII", NBD_INFO_BLOCK_SIZE, minimum,
                                                  preferred, exp.max_transfer))
        self._opt_reply(NBD_REP_INFO, struct.pack(">HQH", NBD_INFO_EXPORT, exp.size,
                                                  self._export_flags(exp)))
        if self.opt == NBD_OPT_INFO and not blocksize and exp.request_alignment > 1:
            self._opt_error(NBD_REP_ERR_BLOCK_SIZE_REQD,
                            "request NBD_INFO_BLOCK_SIZE to use this export")
            return False
        self._opt_reply(NBD_REP_ACK)
        if self.opt == NBD_OPT_GO:
            if self.meta_export is not None and self.meta_export != name:
                # Contexts were negotiated for another export (nbd_check_meta_export).
                self.base_allocation = False
            self.exp = exp
            return True
        return False

    def _handle_meta_context(self, data: bytes) -> None:
        """Port of ``nbd_negotiate_meta_queries`` (``base:allocation`` only)."""
        is_set = self.opt == NBD_OPT_SET_META_CONTEXT
        if is_set and not self.structured_reply:
            self._opt_error(NBD_REP_ERR_INVALID, "set meta context without structured reply")
            return
        if is_set:
            self.base_allocation = False
            self.meta_export = None
        try:
            (namelen,) = _U32.unpack_from(data, 0)
            if namelen > NBD_MAX_STRING_SIZE:
                self._opt_error(NBD_REP_ERR_INVALID, "meta context: export name too long")
                return
            name_b = data[4:4 + namelen]
            if len(name_b) != namelen:
                raise struct.error("short name")
            pos = 4 + namelen
            (nq,) = _U32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                (ql,) = _U32.unpack_from(data, pos)
                pos += 4
                q = data[pos:pos + ql]
                if len(q) != ql:
                    raise struct.error("short query")
                pos += ql
                queries.append(q)
            if pos != len(data):
                raise struct.error("trailing data")
        except struct.error:
            self._opt_error(NBD_REP_ERR_INVALID, "meta context: option data is malformed")
            return
        name = name_b.decode("utf-8", "replace")
        if name not in self.server.exports:
            self._opt_error(NBD_REP_ERR_UNKNOWN, f"export {name!r} not present")
            return
        want = not queries and not is_set
        for q in queries:
            if len(q) > NBD_MAX_STRING_SIZE:
                continue
            if q == b"base:allocation" or (q == b"base:" and not is_set):
                want = True
        if want:
            ctx_id = NBD_META_ID_BASE_ALLOCATION
            self._opt_reply(NBD_REP_META_CONTEXT, _U32.pack(ctx_id) + b"base:allocation")
        self._opt_reply(NBD_REP_ACK)
        if is_set:
            self.base_allocation = want
            self.meta_export = name

    def _co_client_start(self, _: Any) -> None:
        """Port of ``nbd_co_client_start``: the handshake coroutine."""
        try:
            try:
                self._co_negotiate()
            except NBDDisconnect as e:
                if str(e) and not self.closing:
                    log.warning("nbd %s: handshake failed: %s", self.peer, e)
                self.close(False)
                return
            if self.closing:
                return
            self.negotiated = True
            if self._handshake_timer is not None:
                timer_del(self._handshake_timer)
            log.info("nbd %s: connected to export %r%s", self.peer, self.exp.name,  # type: ignore[union-attr]
                     " (structured replies)" if self.structured_reply else "")
            self.server._client_negotiated(self)
            self._receive_next_request()
        finally:
            self._unref()

    def _handshake_timeout(self, _: Any) -> None:
        if not self.negotiated and not self.closing:
            log.warning("nbd %s: handshake not finished within %.0f s, dropping", self.peer,
                        self.server.handshake_limit)
            self.close(False)

    def start(self) -> None:
        """``nbd_client_new``: arm the handshake limit and start negotiating."""
        if self.server.handshake_limit:
            self._handshake_timer = aio_timer_new(self.ctx, QEMU_CLOCK_REALTIME, SCALE_MS,
                                                  self._handshake_timeout, None)
            timer_mod(self._handshake_timer, qemu_clock_get_ms(QEMU_CLOCK_REALTIME)
                      + int(self.server.handshake_limit * 1000))
        self._ref()
        co = qemu_coroutine_create(self._co_client_start, None)
        qemu_coroutine_enter(co)

    # -- transmission (nbd_trip and friends) ----------------------------------
    def _receive_next_request(self) -> None:
        """Port of ``nbd_client_receive_next_request``."""
        if self.recv_coroutine is None and self.nb_requests < MAX_NBD_REQUESTS and not self.closing:
            self._ref()
            self.nb_requests += 1
            co = qemu_coroutine_create(self._co_trip, None)
            self.recv_coroutine = co
            # QEMU schedules it through a BH; aio_co_enter runs it as soon as
            # the calling coroutine yields (or at once outside a coroutine),
            # which saves an event-loop iteration per request.
            aio_co_enter(self.ctx, co)

    def _co_receive_request(self, req: _Req) -> int:
        """Port of ``nbd_co_receive_request``: read and check one request.

        Returns 0 (valid), ``_DISC``, or a negative errno to reply with
        (``req.complete`` says whether the stream is still in sync).  Raises
        NBDDisconnect when the stream cannot be resynchronised.
        """
        p = self._rpos
        if self._rend - p >= _REQUEST_SIZE:
            self._rpos = p + _REQUEST_SIZE
            magic, flags, type, handle, from_, length = _REQUEST_UNPACK_FROM(self._rbuf, p)
        else:
            magic, flags, type, handle, from_, length = REQUEST.unpack(self._co_read(_REQUEST_SIZE))
        if magic != NBD_REQUEST_MAGIC:
            raise NBDDisconnect(f"invalid request magic {magic:#x}")
        request = req.request = NBDRequest(handle, from_, length, flags, type)
        if type == NBD_CMD_DISC:
            # Special case: we are going to disconnect without a reply.
            return _DISC
        exp = self.exp
        assert exp is not None
        req.complete = True
        if type in (NBD_CMD_READ, NBD_CMD_WRITE):
            if length > NBD_MAX_BUFFER_SIZE:
                log.warning("nbd %s: %s length %d is larger than %d", self.peer,
                            nbd_cmd_lookup(type), length, NBD_MAX_BUFFER_SIZE)
                # A write payload that large is not consumed: reply, then drop.
                req.complete = type != NBD_CMD_WRITE
                return -errno.EINVAL
            try:
                req.buf, req.data, req.qiov = self.server._pool.get(exp.bs, length)
            except MemoryError:
                req.complete = type != NBD_CMD_WRITE
                return -errno.ENOMEM
        if type == NBD_CMD_WRITE:
            req.complete = False
            self._co_read_into(req.data)  # type: ignore[arg-type]
            req.complete = True
        if exp.readonly and type in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES, NBD_CMD_TRIM):
            log.info("nbd %s: %s refused: export is read-only", self.peer, nbd_cmd_lookup(type))
            return -errno.EROFS
        if type not in (NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_FLUSH, NBD_CMD_TRIM,
                        NBD_CMD_WRITE_ZEROES, NBD_CMD_BLOCK_STATUS):
            log.warning("nbd %s: unsupported request type %d (%s)", self.peer, type,
                        nbd_cmd_lookup(type))
            return -errno.EINVAL
        if from_ > exp.size or length > exp.size - from_:
            log.warning("nbd %s: %s past end of file: offset %d length %d size %d", self.peer,
                        nbd_cmd_lookup(type), from_, length, exp.size)
            return -errno.ENOSPC if type in (NBD_CMD_WRITE, NBD_CMD_WRITE_ZEROES) else -errno.EINVAL
        valid = NBD_CMD_FLAG_FUA
        if type == NBD_CMD_READ and self.structured_reply:
            valid |= NBD_CMD_FLAG_DF
        elif type == NBD_CMD_WRITE_ZEROES:
            valid |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
        elif type == NBD_CMD_BLOCK_STATUS:
            valid |= NBD_CMD_FLAG_REQ_ONE
        if flags & ~valid:
            log.warning("nbd %s: unsupported flags %#x for %s", self.peer, flags & ~valid,
                        nbd_cmd_lookup(type))
            return -errno.EINVAL
        return 0

    def _co_trip(self, _: Any) -> None:
        """Port of ``nbd_trip``: one request, from receipt to reply."""
        req = _Req()
        try:
            if self.closing:
                return
            try:
                ret = self._co_receive_request(req)
            except NBDDisconnect as e:
                if not self.closing:
                    log.info("nbd %s: %s", self.peer, e)
                self.recv_coroutine = None
                self.close()
                return
            self.recv_coroutine = None
            if self.closing:
                return
            if ret == _DISC:
                log.info("nbd %s: client disconnected", self.peer)
                self.close()
                return
            # Let the next request be received while this one runs.
            self._receive_next_request()
            request = req.request
            assert request is not None
            if ret < 0:
                self._co_send_generic(request.handle, ret, "request refused")
                if not req.complete:
                    log.warning("nbd %s: payload not consumed, disconnecting", self.peer)
                    self.close()
                return
            self._co_handle_request(request, req)
        except NBDDisconnect as e:
            if not self.closing:
                log.info("nbd %s: %s", self.peer, e)
            self.close()
        finally:
            if req.buf is not None:
                self.server._pool.put(req.buf, req.data)  # type: ignore[arg-type]
                req.buf = req.data = req.qiov = None
            # nbd_request_put: one slot free, maybe receive again.
            self.nb_requests -= 1
            if not self.closing:
                self._receive_next_request()
            self._unref()

    def _co_handle_request(self, request: NBDRequest, req: _Req) -> None:
        """Port of ``nbd_handle_request``."""
        exp = self.exp
        assert exp is not None
        bs = exp.bs
        type = request.type
        flags = 0
        if request.flags & NBD_CMD_FLAG_FUA or exp.writethrough:
            flags |= BDRV_REQ_FUA
        if type == NBD_CMD_READ:
            self._co_handle_read(request, req, bs)
            return
        if type == NBD_CMD_WRITE:
            qiov = req.qiov
            if qiov is None:
                qiov = QEMUIOVector()
                qemu_iovec_init_buf(qiov, req.data)
            ret = bdrv_co_pwritev(bs, request.from_, request.len, qiov, flags)
            self._co_send_generic(request.handle, ret, "writing to file failed")
        elif type == NBD_CMD_WRITE_ZEROES:
            if not (request.flags & NBD_CMD_FLAG_NO_HOLE):
                flags |= BDRV_REQ_MAY_UNMAP
            if request.flags & NBD_CMD_FLAG_FAST_ZERO:
                flags |= BDRV_REQ_NO_FALLBACK
            ret = 0
            off, left = request.from_, request.len
            # One NBD request may be larger than one block-layer request.
            while left > 0 and ret >= 0:
                n = min(left, BDRV_REQUEST_MAX_BYTES)
                ret = bdrv_co_pwrite_zeroes(bs, off, n, flags)
                off += n
                left -= n
            self._co_send_generic(request.handle, ret, "writing to file failed")
        elif type == NBD_CMD_FLUSH:
            ret = bdrv_co_flush(bs)
            self._co_send_generic(request.handle, ret, "flush failed")
        elif type == NBD_CMD_TRIM:
            ret = 0
            off, left = request.from_, request.len
            while left > 0 and ret >= 0:
                n = min(left, BDRV_REQUEST_MAX_BYTES)
                ret = bdrv_co_pdiscard(bs, off, n)
                off += n
                left -= n
            if ret >= 0 and flags & BDRV_REQ_FUA:
                ret = bdrv_co_flush(bs)
            self._co_send_generic(request.handle, ret, "discard failed")
        elif type == NBD_CMD_BLOCK_STATUS:
            if not request.len:
                self._co_send_generic(request.handle, -errno.EINVAL, "need non-zero length")
            elif not (self.structured_reply and self.base_allocation):
                self._co_send_generic(request.handle, -errno.EINVAL,
                                      "CMD_BLOCK_STATUS not negotiated")
            else:
                self._co_send_block_status(request, bs)
        else:  # unreachable: rejected in _co_receive_request
            self._co_send_generic(request.handle, -errno.EINVAL, "invalid request type")

    def _co_send_block_status(self, request: NBDRequest, bs: BlockDriverState) -> None:
        """Port of ``nbd_co_send_block_status`` + ``blockstatus_to_extents``
        for ``base:allocation``: one extent per run of equal flags --
        ``NBD_STATE_HOLE`` where the device has no data, ``NBD_STATE_ZERO``
        where it reads as zeros -- at most ``NBD_MAX_BLOCK_STATUS_EXTENTS``
        (one with ``NBD_CMD_FLAG_REQ_ONE``).  A short answer is allowed:
        the client asks again for the rest."""
        max_extents = 1 if request.flags & NBD_CMD_FLAG_REQ_ONE else NBD_MAX_BLOCK_STATUS_EXTENTS
        extents: list[list[int]] = []
        offset, left = request.from_, request.len
        while left > 0:
            ret, num, _, _ = bdrv_co_block_status(bs, True, offset, left)
            if ret < 0:
                self._co_send_generic(request.handle, ret, "can't get block status")
                return
            if num <= 0:  # the device shrank under us: stop here
                break
            flags = (0 if ret & BDRV_BLOCK_DATA else NBD_STATE_HOLE) | \
                (NBD_STATE_ZERO if ret & BDRV_BLOCK_ZERO else 0)
            last = extents[-1] if extents else None
            if last is not None and last[1] == flags and last[0] + num <= 0xFFFFFFFF:
                last[0] += num  # nbd_extent_array_add merges equal neighbours
            elif len(extents) < max_extents:
                extents.append([num, flags])
            else:
                break
            offset += num
            left -= num
        if not extents:
            self._co_send_generic(request.handle, -errno.EIO, "can't get block status")
            return
        payload = _U32.pack(NBD_META_ID_BASE_ALLOCATION) + \
            b"".join(_U32_U32.pack(n, f) for n, f in extents)
        self._co_send_chunk(request.handle, NBD_REPLY_FLAG_DONE,
                            NBD_REPLY_TYPE_BLOCK_STATUS, [payload])

    def _co_handle_read(self, request: NBDRequest, req: _Req, bs: BlockDriverState) -> None:
        """Port of ``nbd_do_cmd_read``."""
        ret = 0
        if request.flags & NBD_CMD_FLAG_FUA:
            # XXX as QEMU: FUA on a read means "flush first".
            ret = bdrv_co_flush(bs)
        if ret >= 0 and request.len:
            qiov = req.qiov
            if qiov is None:
                qiov = QEMUIOVector()
                qemu_iovec_init_buf(qiov, req.data)
            ret = bdrv_co_preadv(bs, request.from_, request.len, qiov, 0)
        if ret < 0:
            self._co_send_generic(request.handle, ret, "reading from file failed")
            return
        if self.structured_reply:
            if request.len:
                self._co_send_locked([_OFFSET_DATA_CHUNK.pack(
                    NBD_STRUCTURED_REPLY_MAGIC, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                    request.handle, 8 + request.len, request.from_), req.data], req)
            else:
                self._co_send_chunk(request.handle, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, [])
        else:
            self._co_send_locked([SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, request.handle),
                                  req.data], req)

    # -- replies -------------------------------------------------------------
    def _co_send_locked(self, bufs: list, req: Optional[_Req] = None) -> None:
        """Send one whole reply, never interleaved with another.

        Not in QEMU, which writes every reply at once: when the next
        request's header is already in the read-ahead buffer, its reply (and
        the ones after it) will follow within this event-loop iteration, so
        this reply is corked and goes out with them in one sendmsg.  Each
        write to the socket wakes the client, and on a virtual machine those
        wake-ups cost more than the rest of a small request.  The last
        request of the burst (nothing more buffered) sends everything; if
        that request blocks instead (a write still waiting for its payload,
        a read that went to the thread pool), ``_flush_bh`` sends it at the
        next iteration.  ``req``'s buffer, if it carries the payload, is
        recycled only once it is sent.
        """
        cork = self._cork
        if (self._rend - self._rpos >= _REQUEST_SIZE and self.send_lock.holder is None
                and len(cork) + len(bufs) <= _CORK_MAX_PIECES
                and self._cork_bytes < _CORK_MAX_BYTES and not self.closing):
            if not cork:
                qemu_bh_schedule(self._flush_bh)
            n = 0
            for b in bufs:
                n += b.nbytes if b.__class__ is memoryview else len(b)
            cork += bufs
            self._cork_bytes += n
            if req is not None and req.buf is not None:
                self._cork_release.append((req.buf, req.data))
                req.buf = req.data = req.qiov = None
            return
        if not cork and self.send_lock.holder is None and not self.closing:
            # Nobody is writing: one sendmsg usually takes the whole reply,
            # and until this coroutine yields nobody else can write, so the
            # lock is needed only if the socket is full.
            try:
                n = self.sock.sendmsg(bufs)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as e:
                raise NBDDisconnect(f"write failed: {e.strerror or e}") from None
            total = 0
            for b in bufs:
                total += b.nbytes if b.__class__ is memoryview else len(b)
            if n == total:
                return
            bufs = _drop_sent(bufs, n)
        qemu_co_mutex_lock(self.send_lock)
        try:
            self._co_write_after_cork(bufs)
        finally:
            qemu_co_mutex_unlock(self.send_lock)

    def _co_write_after_cork(self, bufs: list) -> None:
        # With send_lock held: whatever was corked goes first, in the same
        # sendmsg, and its buffers are recycled once it is out.
        cork = self._cork
        if not cork:
            self._co_write(bufs)
            return
        self._cork = []
        self._cork_bytes = 0
        cork += bufs
        try:
            self._co_write(cork)
        finally:
            self._release_corked()

    def _release_corked(self) -> None:
        if self._cork_release:
            put = self.server._pool.put
            for buf, view in self._cork_release:
                put(buf, view)
            self._cork_release = []

    def _flush_cb(self, _: Any) -> None:
        # Corked replies whose burst ended without a reply that sends them.
        if self._cork and not self.closing:
            self._ref()
            qemu_coroutine_enter(qemu_coroutine_create(self._co_flush, None))

    def _co_flush(self, _: Any) -> None:
        try:
            if self._cork:
                qemu_co_mutex_lock(self.send_lock)
                try:
                    self._co_write_after_cork([])
                finally:
                    qemu_co_mutex_unlock(self.send_lock)
        except NBDDisconnect as e:
            if not self.closing:
                log.info("nbd %s: %s", self.peer, e)
            self.close()
        finally:
            self._unref()

    def _co_send_chunk(self, handle: int, flags: int, type: int, bufs: list,
                       req: Optional[_Req] = None) -> None:
        length = sum(len(b) if not isinstance(b, memoryview) else b.nbytes for b in bufs)
        hdr = STRUCTURED_REPLY.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, type, handle, length)
        self._co_send_locked([hdr, *bufs], req)

    def _co_send_generic(self, handle: int, ret: int, msg: str) -> None:
        """Port of ``nbd_send_generic_reply``: a simple reply, or an error
        chunk when structured replies are on and the request failed."""
        if ret < 0:
            err = system_errno_to_nbd_errno(-ret)
            log.debug("nbd %s: replying %s (%s)", self.peer, nbd_err_lookup(err), msg)
            if self.structured_reply:
                m = msg.encode()
                self._co_send_chunk(handle, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                                    [_ERROR_CHUNK.pack(err, len(m)), m])
                return
        else:
            err = 0
        self._co_send_locked([SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, err, handle)])


# --------------------------------------------------------------------------
# The server

Address = Union[str, tuple]


class NBDServer:
    """An NBD server on an AioContext: QEMU's ``nbd_server_start`` +
    ``nbd_export_new`` + the accept loop of qemu-nbd.

    ``NBDServer(bs, name="", ctx=None, readonly=False, description=None,
    max_connections=0, persistent=True, writethrough=False, multi_conn=None)``

    ``bs`` may be None (add exports later with :meth:`add_export`).  ``ctx``
    is the context that serves (default: the caller's current context, or the
    device's); an exported device is moved into it (QEMU's ``iothread``
    export option).  ``max_connections`` (qemu-nbd ``-e``; 0 = unlimited)
    stops accepting while that many clients are connected.  Without
    ``persistent`` (qemu-nbd without ``-t``) :attr:`finished` becomes True
    once the last client that completed the handshake has gone.
    ``multi_conn`` defaults to ``max_connections != 1``.

    Every method runs in the home thread of ``ctx``.  Listen with
    :meth:`listen_unix` / :meth:`listen_tcp`, drive ``aio_poll(ctx, True)``
    (or :meth:`run`), stop with :meth:`close`.  Usable as a context manager.
    """

    def __init__(self, bs: Optional[BlockDriverState] = None, name: str = "", *,
                 ctx: Optional[AioContext] = None, readonly: bool = False,
                 description: Optional[str] = None, max_connections: int = 0,
                 persistent: bool = True, writethrough: bool = False,
                 multi_conn: Optional[bool] = None,
                 handshake_limit: float = HANDSHAKE_LIMIT_S) -> None:
        if ctx is None:
            ctx = qemu_get_current_aio_context()
            if ctx is None:
                if bs is None:
                    raise ValueError("NBDServer: no context given and the calling thread has none "
                                     "(call qemu_init_main_loop or qemu_set_current_aio_context)")
                ctx = bdrv_get_aio_context(bs)
        if not isinstance(ctx, AioContext):
            raise TypeError(f"NBDServer: ctx must be an AioContext, got {type(ctx).__name__}")
        if not isinstance(max_connections, int) or max_connections < 0:
            raise ValueError(f"NBDServer: max_connections must be an int >= 0, got {max_connections!r}")
        self.ctx = ctx
        self.max_connections = max_connections
        self.persistent = persistent
        self.handshake_limit = handshake_limit
        self.multi_conn = (max_connections != 1) if multi_conn is None else bool(multi_conn)
        self.exports: dict[str, NBDExport] = {}
        self.clients: list[NBDClient] = []
        self.listeners: list[tuple[socket.socket, Optional[str]]] = []
        self._listening = False
        self.finished = False
        self.closed = False
        self._moved: list[tuple[BlockDriverState, AioContext]] = []
        self._pool = _BufferPool(4096)
        self.on_finished: Optional[Callable[["NBDServer"], None]] = None
        if bs is not None:
            self.add_export(bs, name, readonly=readonly, description=description,
                            writethrough=writethrough)

    # -- exports -------------------------------------------------------------
    def add_export(self, bs: BlockDriverState, name: str = "", *, readonly: bool = False,
                   description: Optional[str] = None, writethrough: bool = False) -> NBDExport:
        """Port of ``nbd_export_create``: offer ``bs`` under ``name``."""
        if self.closed:
            raise ValueError("NBDServer: the server is closed")
        if name in self.exports:
            raise ValueError(f"NBDServer: an export named {name!r} already exists")
        old = bdrv_get_aio_context(bs)
        if old is not self.ctx:
            _bdrv_set_aio_context(bs, self.ctx)
            self._moved.append((bs, old))
        exp = NBDExport(bs, name, description, readonly, writethrough, self.multi_conn)
        self.exports[name] = exp
        self._pool.align = max(self._pool.align, bs.bl.opt_mem_alignment)
        return exp

    # -- listening -------------------------------------------------------------
    def listen_unix(self, path: Union[str, os.PathLike]) -> str:
        """Listen on a unix socket at ``path`` (qemu-nbd ``-k``); returns the path."""
        path = os.fspath(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            s.bind(path)
            s.listen(128)
        except BaseException:
            s.close()
            raise
        self.add_listener(s, unlink=path)
        return path

    def listen_tcp(self, host: str = "127.0.0.1", port: int = NBD_DEFAULT_PORT) -> tuple:
        """Listen on TCP (qemu-nbd ``-b``/``-p``); port 0 picks a free one.
        Returns the bound ``(host, port)``."""
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, stype, proto, _, addr = infos[0]
        s = socket.socket(family, stype, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
            s.listen(128)
        except BaseException:
            s.close()
            raise
        self.add_listener(s)
        return s.getsockname()[:2]

    def add_listener(self, sock: socket.socket, unlink: Optional[str] = None) -> None:
        """Serve clients that connect to an already listening socket (the
        server owns it from now on)."""
        if self.closed:
            raise ValueError("NBDServer: the server is closed")
        sock.setblocking(False)
        self.listeners.append((sock, unlink))
        if self._listening or self._may_accept():
            aio_set_fd_handler(self.ctx, sock.fileno(), False, self._on_accept, None,
                               None, None, sock)
            self._listening = True

    @property
    def address(self) -> Any:
        """The first listener's address: a path, or ``(host, port)``."""
        if not self.listeners:
            return None
        s, path = self.listeners[0]
        return path if path is not None else s.getsockname()[:2]

    @property
    def port(self) -> Optional[int]:
        for s, path in self.listeners:
            if path is None:
                return s.getsockname()[1]
        return None

    def _may_accept(self) -> bool:
        return not self.closed and not self.finished and (
            self.max_connections == 0 or len(self.clients) < self.max_connections)

    def _update_watch(self) -> None:
        """Port of qemu-nbd's ``nbd_update_server_watch``."""
        want = self._may_accept()
        if want == self._listening:
            return
        self._listening = want
        for s, _ in self.listeners:
            if want:
                aio_set_fd_handler(self.ctx, s.fileno(), False, self._on_accept, None, None, None, s)
            else:
                aio_set_fd_handler(self.ctx, s.fileno(), False, None, None, None, None, None)

    def _on_accept(self, listener: socket.socket) -> None:
        """Port of ``nbd_accept``."""
        while self._may_accept():
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("nbd: accept failed: %s", e)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                # Small replies must not wait for Nagle's algorithm.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                peer = f"{addr[0]}:{addr[1]}"
            else:
                peer = f"unix:{listener.getsockname() or '?'}#{sock.fileno()}"
            client = NBDClient(self, sock, peer)
            self.clients.append(client)
            log.debug("nbd %s: accepted", peer)
            self._update_watch()
            client.start()

    # -- client bookkeeping ----------------------------------------------------
    def _client_negotiated(self, client: NBDClient) -> None:
        pass

    def _client_closed(self, client: NBDClient, negotiated: bool) -> None:
        """Port of qemu-nbd's ``nbd_client_closed``."""
        if negotiated and not self.persistent:
            others = [c for c in self.clients if c is not client and not c.closing]
            if not others:
                self._finish()

    def _client_gone(self, client: NBDClient) -> None:
        try:
            self.clients.remove(client)
        except ValueError:
            pass
        self._update_watch()
        aio_notify(self.ctx)

    def _finish(self) -> None:
        if not self.finished:
            self.finished = True
            self._update_watch()
            aio_notify(self.ctx)
            if self.on_finished is not None:
                self.on_finished(self)

    # -- running and stopping -----------------------------------------------------
    def run(self, stop: Optional[Callable[[], bool]] = None) -> None:
        """Serve until :attr:`finished` (a non-persistent server's last
        client left), ``stop()`` returns True, or the server is closed.
        Home thread of ``ctx`` only."""
        from ..aio import aio_poll
        while not self.closed and not self.finished and not (stop is not None and stop()):
            aio_poll(self.ctx, True)

    def close(self, flush: bool = True) -> None:
        """Stop serving: stop listening, disconnect every client, wait for
        their requests in flight, then drain (and flush) each device and
        hand it back to its original context (``nbd_export_close`` +
        qemu-nbd's shutdown).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        for s, path in self.listeners:
            if self._listening:
                aio_set_fd_handler(self.ctx, s.fileno(), False, None, None, None, None, None)
            s.close()
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        self._listening = False
        self.listeners = []
        for c in list(self.clients):
            c.close()
        aio_wait_while(self.ctx, lambda: bool(self.clients))
        for exp in self.exports.values():
            bdrv_drain(exp.bs)
            if flush and not exp.readonly and not exp.bs.closed:
                ret = bdrv_flush(exp.bs)
                if ret < 0:
                    log.error("nbd: flushing export %r failed: %s", exp.name, os.strerror(-ret))
        for bs, old in self._moved:
            if not bs.closed:
                _bdrv_set_aio_context(bs, old)
        self._moved = []
        self._pool.free.clear()

    def __enter__(self) -> "NBDServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<NBDServer exports={list(self.exports)} clients={len(self.clients)}"
                f"{' closed' if self.closed else ''}>")
