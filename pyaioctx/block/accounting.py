# SPDX-License-Identifier: GPL-2.0-or-later
"""Per-device I/O accounting: port of QEMU's block/accounting.c.

QEMU keeps a ``BlockAcctStats`` per BlockBackend; a device model brackets
each request with ``block_acct_start`` / ``block_acct_done`` (or
``block_acct_failed``), and ``block_acct_invalid`` counts requests refused
before they started.  pyaioctx has no separate BlockBackend, so the generic
block layer does the bracketing itself for every request a user submits to a
BlockDriverState (reads, writes, flushes and discards).

Counting rules, as in QEMU: a successful request adds to ``nr_ops`` and
``nr_bytes`` of its type; a failed one only to ``failed_ops``; its latency
goes to ``total_time_ns`` when it succeeded or ``account_failed`` is set
(the default, as for QEMU's devices).  Bytes are the bytes the caller asked
for, not the padded bytes the driver moved.

:func:`block_acct_snapshot` returns a frozen :class:`BlockDeviceStats` with
the field names of QEMU's QAPI ``BlockDeviceStats`` (``query-blockstats``).

Threads: all functions run in the device's home thread (QEMU takes
``stats->lock`` because its requests may run in several threads; ours do not).
"""

from __future__ import annotations

import dataclasses
import enum
import time

_monotonic_ns = time.monotonic_ns

__all__ = [
    "BlockAcctType",
    "BLOCK_ACCT_NONE",
    "BLOCK_ACCT_READ",
    "BLOCK_ACCT_WRITE",
    "BLOCK_ACCT_FLUSH",
    "BLOCK_ACCT_UNMAP",
    "BlockAcctStats",
    "BlockAcctCookie",
    "BlockDeviceStats",
    "block_acct_init",
    "block_acct_setup",
    "block_acct_start",
    "block_acct_done",
    "block_acct_failed",
    "block_acct_invalid",
    "block_acct_snapshot",
]


class BlockAcctType(enum.IntEnum):
    """QEMU's ``enum BlockAcctType`` (values as in QEMU 8)."""

    NONE = 0        # cookie already accounted (or never started)
    READ = 1
    WRITE = 2
    ZONE_APPEND = 3  # kept for numbering parity; never used here
    FLUSH = 4
    UNMAP = 5


BLOCK_ACCT_NONE = BlockAcctType.NONE
BLOCK_ACCT_READ = BlockAcctType.READ
BLOCK_ACCT_WRITE = BlockAcctType.WRITE
BLOCK_ACCT_FLUSH = BlockAcctType.FLUSH
BLOCK_ACCT_UNMAP = BlockAcctType.UNMAP
_NTYPES = 6


class BlockAcctStats:
    """QEMU's ``BlockAcctStats``: live counters, indexed by BlockAcctType.

    Home thread only.  Read a consistent copy with :func:`block_acct_snapshot`.
    """

    __slots__ = ("nr_bytes", "nr_ops", "invalid_ops", "failed_ops", "total_time_ns",
                 "last_access_time_ns", "account_invalid", "account_failed",
                 "wr_highest_offset")

    def __init__(self) -> None:
        block_acct_init(self)

    def __repr__(self) -> str:
        return (f"<BlockAcctStats rd={self.nr_ops[BLOCK_ACCT_READ]} "
                f"wr={self.nr_ops[BLOCK_ACCT_WRITE]} flush={self.nr_ops[BLOCK_ACCT_FLUSH]} "
                f"failed={sum(self.failed_ops)}>")


class BlockAcctCookie:
    """QEMU's ``BlockAcctCookie``: one request's bracket (caller-allocated)."""

    __slots__ = ("bytes", "start_time_ns", "type")

    def __init__(self) -> None:
        self.bytes = 0
        self.start_time_ns = 0
        self.type = BLOCK_ACCT_NONE


@dataclasses.dataclass(frozen=True)
class BlockDeviceStats:
    """A snapshot with QEMU's QAPI ``BlockDeviceStats`` field names."""

    rd_bytes: int
    wr_bytes: int
    unmap_bytes: int
    rd_operations: int
    wr_operations: int
    flush_operations: int
    unmap_operations: int
    rd_total_time_ns: int
    wr_total_time_ns: int
    flush_total_time_ns: int
    unmap_total_time_ns: int
    failed_rd_operations: int
    failed_wr_operations: int
    failed_flush_operations: int
    failed_unmap_operations: int
    invalid_rd_operations: int
    invalid_wr_operations: int
    invalid_flush_operations: int
    invalid_unmap_operations: int
    wr_highest_offset: int
    account_invalid: bool
    account_failed: bool


def block_acct_init(stats: BlockAcctStats) -> None:
    """Port of ``block_acct_init``: zero every counter."""
    stats.nr_bytes = [0] * _NTYPES
    stats.nr_ops = [0] * _NTYPES
    stats.invalid_ops = [0] * _NTYPES
    stats.failed_ops = [0] * _NTYPES
    stats.total_time_ns = [0] * _NTYPES
    stats.last_access_time_ns = 0
    stats.account_invalid = True
    stats.account_failed = True
    stats.wr_highest_offset = 0


def block_acct_setup(stats: BlockAcctStats, account_invalid: bool, account_failed: bool) -> None:
    """Port of ``block_acct_setup``."""
    stats.account_invalid = bool(account_invalid)
    stats.account_failed = bool(account_failed)


def block_acct_start(stats: BlockAcctStats, cookie: BlockAcctCookie, bytes: int,
                     type: int) -> None:
    """Port of ``block_acct_start``: fill ``cookie`` for a request of ``bytes``."""
    if type.__class__ is not BlockAcctType:
        if not 0 < int(type) < _NTYPES:
            raise ValueError(f"block_acct_start: invalid BlockAcctType {type!r}")
        type = BlockAcctType(type)
    elif not type:
        raise ValueError(f"block_acct_start: invalid BlockAcctType {type!r}")
    cookie.bytes = bytes
    cookie.start_time_ns = _monotonic_ns()
    cookie.type = type


def _account_one_io(stats: BlockAcctStats, cookie: BlockAcctCookie, failed: bool) -> None:
    # Port of block_account_one_io.  The cookie is spent afterwards, so
    # accounting a request twice is harmless (QEMU relies on that too).
    t = cookie.type
    if t == BLOCK_ACCT_NONE:
        return
    _account_request(stats, int(t), cookie.bytes, cookie.start_time_ns, failed)
    cookie.type = BLOCK_ACCT_NONE


def _account_request(stats: BlockAcctStats, t: int, nbytes: int, start_ns: int,
                     failed: bool) -> None:
    # block_account_one_io without a cookie, for the generic block layer's
    # request path: ``t`` is a plain int (indexing with the IntEnum costs
    # more) and ``start_ns`` the time.monotonic_ns() taken when the request
    # started.  Same counting rules as block_acct_done/_failed.
    now = _monotonic_ns()
    if failed:
        stats.failed_ops[t] += 1
        if not stats.account_failed:
            return
    else:
        stats.nr_bytes[t] += nbytes
        stats.nr_ops[t] += 1
    stats.total_time_ns[t] += now - start_ns
    stats.last_access_time_ns = now


def block_acct_done(stats: BlockAcctStats, cookie: BlockAcctCookie) -> None:
    """Port of ``block_acct_done``."""
    _account_one_io(stats, cookie, False)


def block_acct_failed(stats: BlockAcctStats, cookie: BlockAcctCookie) -> None:
    """Port of ``block_acct_failed``."""
    _account_one_io(stats, cookie, True)


def block_acct_invalid(stats: BlockAcctStats, type: int) -> None:
    """Port of ``block_acct_invalid``: a request refused before it started."""
    if not 0 < int(type) < _NTYPES:
        raise ValueError(f"block_acct_invalid: invalid BlockAcctType {type!r}")
    stats.invalid_ops[type] += 1
    if stats.account_invalid:
        stats.last_access_time_ns = _monotonic_ns()


def block_acct_snapshot(stats: BlockAcctStats) -> BlockDeviceStats:
    """A frozen copy of ``stats`` (what QEMU's ``query-blockstats`` reports)."""
    R, W, F, U = BLOCK_ACCT_READ, BLOCK_ACCT_WRITE, BLOCK_ACCT_FLUSH, BLOCK_ACCT_UNMAP
    return BlockDeviceStats(
        rd_bytes=stats.nr_bytes[R], wr_bytes=stats.nr_bytes[W], unmap_bytes=stats.nr_bytes[U],
        rd_operations=stats.nr_ops[R], wr_operations=stats.nr_ops[W],
        flush_operations=stats.nr_ops[F], unmap_operations=stats.nr_ops[U],
        rd_total_time_ns=stats.total_time_ns[R], wr_total_time_ns=stats.total_time_ns[W],
        flush_total_time_ns=stats.total_time_ns[F], unmap_total_time_ns=stats.total_time_ns[U],
        failed_rd_operations=stats.failed_ops[R], failed_wr_operations=stats.failed_ops[W],
        failed_flush_operations=stats.failed_ops[F], failed_unmap_operations=stats.failed_ops[U],
        invalid_rd_operations=stats.invalid_ops[R], invalid_wr_operations=stats.invalid_ops[W],
        invalid_flush_operations=stats.invalid_ops[F], invalid_unmap_operations=stats.invalid_ops[U],
        wr_highest_offset=stats.wr_highest_offset,
        account_invalid=stats.account_invalid, account_failed=stats.account_failed,
    )
