# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD wire protocol: constants and structures.

Port of QEMU's include/block/nbd.h and the helpers of nbd/common.c
(``nbd_opt_lookup``, ``nbd_cmd_lookup``, ``nbd_err_lookup``, ...).  Values
are those of the NBD protocol specification (NetworkBlockDevice/nbd,
doc/proto.md).  Everything on the wire is big-endian.
"""

from __future__ import annotations

import errno
import struct

__all__ = [
    "NBD_INIT_MAGIC", "NBD_OPTS_MAGIC", "NBD_CLIENT_MAGIC", "NBD_REP_MAGIC",
    "NBD_REQUEST_MAGIC", "NBD_SIMPLE_REPLY_MAGIC", "NBD_STRUCTURED_REPLY_MAGIC",
    "NBD_FLAG_FIXED_NEWSTYLE", "NBD_FLAG_NO_ZEROES",
    "NBD_FLAG_C_FIXED_NEWSTYLE", "NBD_FLAG_C_NO_ZEROES",
    "NBD_FLAG_HAS_FLAGS", "NBD_FLAG_READ_ONLY", "NBD_FLAG_SEND_FLUSH", "NBD_FLAG_SEND_FUA",
    "NBD_FLAG_ROTATIONAL", "NBD_FLAG_SEND_TRIM", "NBD_FLAG_SEND_WRITE_ZEROES",
    "NBD_FLAG_SEND_DF", "NBD_FLAG_CAN_MULTI_CONN", "NBD_FLAG_SEND_RESIZE",
    "NBD_FLAG_SEND_CACHE", "NBD_FLAG_SEND_FAST_ZERO",
    "NBD_OPT_EXPORT_NAME", "NBD_OPT_ABORT", "NBD_OPT_LIST", "NBD_OPT_PEEK_EXPORT",
    "NBD_OPT_STARTTLS", "NBD_OPT_INFO", "NBD_OPT_GO", "NBD_OPT_STRUCTURED_REPLY",
    "NBD_OPT_LIST_META_CONTEXT", "NBD_OPT_SET_META_CONTEXT", "NBD_OPT_EXTENDED_HEADERS",
    "NBD_REP_ACK", "NBD_REP_SERVER", "NBD_REP_INFO", "NBD_REP_META_CONTEXT",
    "NBD_REP_ERR_UNSUP", "NBD_REP_ERR_POLICY", "NBD_REP_ERR_INVALID", "NBD_REP_ERR_PLATFORM",
    "NBD_REP_ERR_TLS_REQD", "NBD_REP_ERR_UNKNOWN", "NBD_REP_ERR_SHUTDOWN",
    "NBD_REP_ERR_BLOCK_SIZE_REQD", "NBD_REP_ERR_TOO_BIG",
    "NBD_INFO_EXPORT", "NBD_INFO_NAME", "NBD_INFO_DESCRIPTION", "NBD_INFO_BLOCK_SIZE",
    "NBD_CMD_READ", "NBD_CMD_WRITE", "NBD_CMD_DISC", "NBD_CMD_FLUSH", "NBD_CMD_TRIM",
    "NBD_CMD_CACHE", "NBD_CMD_WRITE_ZEROES", "NBD_CMD_BLOCK_STATUS", "NBD_CMD_RESIZE",
    "NBD_CMD_FLAG_FUA", "NBD_CMD_FLAG_NO_HOLE", "NBD_CMD_FLAG_DF", "NBD_CMD_FLAG_REQ_ONE",
    "NBD_CMD_FLAG_FAST_ZERO",
    "NBD_REPLY_FLAG_DONE", "NBD_REPLY_TYPE_NONE", "NBD_REPLY_TYPE_OFFSET_DATA",
    "NBD_REPLY_TYPE_OFFSET_HOLE", "NBD_REPLY_TYPE_BLOCK_STATUS", "NBD_REPLY_TYPE_ERROR",
    "NBD_REPLY_TYPE_ERROR_OFFSET",
    "NBD_STATE_HOLE", "NBD_STATE_ZERO", "NBD_META_ID_BASE_ALLOCATION",
    "NBD_SUCCESS", "NBD_EPERM", "NBD_EIO", "NBD_ENOMEM", "NBD_EINVAL", "NBD_ENOSPC",
    "NBD_EOVERFLOW", "NBD_ENOTSUP", "NBD_ESHUTDOWN",
    "NBD_DEFAULT_PORT", "NBD_MAX_BUFFER_SIZE", "NBD_MAX_STRING_SIZE",
    "NBDRequest", "REQUEST", "SIMPLE_REPLY", "STRUCTURED_REPLY", "OPTION_HEADER",
    "OPTION_REPLY",
    "system_errno_to_nbd_errno", "nbd_opt_lookup", "nbd_rep_lookup", "nbd_cmd_lookup",
    "nbd_err_lookup", "nbd_info_lookup",
]

# -- Magics (include/block/nbd.h) -------------------------------------------
NBD_INIT_MAGIC = 0x4E42444D41474943          # "NBDMAGIC"
NBD_OPTS_MAGIC = 0x49484156454F5054          # "IHAVEOPT": newstyle
NBD_CLIENT_MAGIC = 0x0000420281861253        # oldstyle (never sent by this server)
NBD_REP_MAGIC = 0x0003E889045565A9           # option reply
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- Handshake flags (16 bits, server) and client flags (32 bits) -----------
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = NBD_FLAG_FIXED_NEWSTYLE
NBD_FLAG_C_NO_ZEROES = NBD_FLAG_NO_ZEROES

# -- Transmission flags (16 bits) --------------------------------------------
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11

# -- Options -----------------------------------------------------------------
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4   # withdrawn by the spec
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# -- Option replies ----------------------------------------------------------
_NBD_REP_ERR = 1 << 31
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR_UNSUP = _NBD_REP_ERR | 1
NBD_REP_ERR_POLICY = _NBD_REP_ERR | 2
NBD_REP_ERR_INVALID = _NBD_REP_ERR | 3
NBD_REP_ERR_PLATFORM = _NBD_REP_ERR | 4
NBD_REP_ERR_TLS_REQD = _NBD_REP_ERR | 5
NBD_REP_ERR_UNKNOWN = _NBD_REP_ERR | 6
NBD_REP_ERR_SHUTDOWN = _NBD_REP_ERR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = _NBD_REP_ERR | 8
NBD_REP_ERR_TOO_BIG = _NBD_REP_ERR | 9

# -- NBD_REP_INFO types ------------------------------------------------------
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# -- Commands and command flags ----------------------------------------------
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7
NBD_CMD_RESIZE = 8

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4

# -- Structured replies ------------------------------------------------------
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_ERROR = (1 << 15) | 1
NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2

# base:allocation extent flags, and the context id this server hands out.
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1
NBD_META_ID_BASE_ALLOCATION = 0

# -- Errors on the wire (not the host's errno values) -------------------------
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

NBD_DEFAULT_PORT = 10809
# Largest READ/WRITE payload and option length accepted (QEMU: 32 MiB).
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024
# Longest export name / description / query string (the spec's limit).
NBD_MAX_STRING_SIZE = 4096

# -- Structures --------------------------------------------------------------
# Request: magic, command flags, type, handle (cookie), offset, length.
REQUEST = struct.Struct(">IHHQQI")
# Simple reply: magic, error, handle.
SIMPLE_REPLY = struct.Struct(">IIQ")
# Structured reply chunk header: magic, flags, type, handle, payload length.
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# Option request header: magic, option, length.
OPTION_HEADER = struct.Struct(">QII")
# Option reply header: magic, option, reply type, length.
OPTION_REPLY = struct.Struct(">QIII")


class NBDRequest:
    """QEMU's ``NBDRequest`` (the parsed 28-byte request header)."""

    __slots__ = ("handle", "from_", "len", "flags", "type")

    def __init__(self, handle: int, from_: int, len: int, flags: int, type: int) -> None:
        self.handle = handle
        self.from_ = from_
        self.len = len
        self.flags = flags
        self.type = type

    def __repr__(self) -> str:
        return (f"<NBDRequest {nbd_cmd_lookup(self.type)} handle={self.handle:#x} "
                f"from={self.from_} len={self.len} flags={self.flags:#x}>")


def system_errno_to_nbd_errno(err: int) -> int:
    """Port of ``system_errno_to_nbd_errno`` (nbd/server.c): map a host
    errno (positive) to the protocol's small fixed set."""
    if err == 0:
        return NBD_SUCCESS
    if err in (errno.EPERM, errno.EROFS):
        return NBD_EPERM
    if err == errno.EIO:
        return NBD_EIO
    if err == errno.ENOMEM:
        return NBD_ENOMEM
    if err in (errno.EDQUOT, errno.EFBIG, errno.ENOSPC):
        return NBD_ENOSPC
    if err == errno.EOVERFLOW:
        return NBD_EOVERFLOW
    if err in (errno.ENOTSUP, errno.EOPNOTSUPP):
        return NBD_ENOTSUP
    if err == errno.ESHUTDOWN:
        return NBD_ESHUTDOWN
    return NBD_EINVAL


_OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "export name", NBD_OPT_ABORT: "abort", NBD_OPT_LIST: "list",
    NBD_OPT_PEEK_EXPORT: "peek export", NBD_OPT_STARTTLS: "starttls", NBD_OPT_INFO: "info",
    NBD_OPT_GO: "go", NBD_OPT_STRUCTURED_REPLY: "structured reply",
    NBD_OPT_LIST_META_CONTEXT: "list meta context", NBD_OPT_SET_META_CONTEXT: "set meta context",
    NBD_OPT_EXTENDED_HEADERS: "extended headers",
}
_REP_NAMES = {
    NBD_REP_ACK: "ack", NBD_REP_SERVER: "server", NBD_REP_INFO: "info",
    NBD_REP_META_CONTEXT: "meta context", NBD_REP_ERR_UNSUP: "unsupported",
    NBD_REP_ERR_POLICY: "denied by policy", NBD_REP_ERR_INVALID: "invalid",
    NBD_REP_ERR_PLATFORM: "platform lacks support", NBD_REP_ERR_TLS_REQD: "TLS required",
    NBD_REP_ERR_UNKNOWN: "export unknown", NBD_REP_ERR_SHUTDOWN: "server shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "block size required", NBD_REP_ERR_TOO_BIG: "option too big",
}
_CMD_NAMES = {
    NBD_CMD_READ: "read", NBD_CMD_WRITE: "write", NBD_CMD_DISC: "disconnect",
    NBD_CMD_FLUSH: "flush", NBD_CMD_TRIM: "trim", NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write zeroes", NBD_CMD_BLOCK_STATUS: "block status",
    NBD_CMD_RESIZE: "resize",
}
_ERR_NAMES = {
    NBD_SUCCESS: "success", NBD_EPERM: "EPERM", NBD_EIO: "EIO", NBD_ENOMEM: "ENOMEM",
    NBD_EINVAL: "EINVAL", NBD_ENOSPC: "ENOSPC", NBD_EOVERFLOW: "EOVERFLOW",
    NBD_ENOTSUP: "ENOTSUP", NBD_ESHUTDOWN: "ESHUTDOWN",
}
_INFO_NAMES = {
    NBD_INFO_EXPORT: "export", NBD_INFO_NAME: "name", NBD_INFO_DESCRIPTION: "description",
    NBD_INFO_BLOCK_SIZE: "block size",
}


def nbd_opt_lookup(opt: int) -> str:
    """Port of ``nbd_opt_lookup`` (nbd/common.c)."""
    return _OPT_NAMES.get(opt, "<unknown>")


def nbd_rep_lookup(rep: int) -> str:
    """Port of ``nbd_rep_lookup``."""
    return _REP_NAMES.get(rep, "<unknown>")


def nbd_cmd_lookup(cmd: int) -> str:
    """Port of ``nbd_cmd_lookup``."""
    return _CMD_NAMES.get(cmd, "<unknown>")


def nbd_err_lookup(err: int) -> str:
    """Port of ``nbd_err_lookup``."""
    return _ERR_NAMES.get(err, "<unknown>")


def nbd_info_lookup(info: int) -> str:
    """Port of ``nbd_info_lookup``."""
    return _INFO_NAMES.get(info, "<unknown>")
