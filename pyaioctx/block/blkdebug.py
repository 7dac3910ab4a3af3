# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``blkdebug`` driver: fault injection, port of QEMU's block/blkdebug.c.

Shape (QEMU's blockdev options)::

    {"driver": "blkdebug",
     "image": {"driver": "file", "filename": path, ...},   # any device options
     "align": 4096,                                         # optional
     "seed": 1,                                             # pyaioctx extension
     "inject-error": [
        {"event": "read_aio", "iotype": "read", "errno": "EIO",
         "sector": 8, "once": True, "immediately": False,
         "probability": 0.5},                               # pyaioctx extension
     ]}

Rule keys, as in QEMU: ``event`` (required; a QEMU blkdebug event name),
``iotype`` (``read``, ``write``, ``write-zeroes``, ``discard``, ``flush``,
``block-status``; default: all but ``block-status``), ``errno`` (int or a
name like ``"EIO"``; default EIO), ``sector`` (512-byte sector the request
must cover; default: any request), ``once`` (remove the rule after it fired),
``immediately`` (fail before yielding; by default the error is delivered
after one trip through the event loop, as QEMU does).

pyaioctx extensions: ``probability`` (0..1, default 1: a matching request
fails with that probability) and the top-level ``seed`` (seeds the private
random generator, so a run is reproducible).

Deviation: QEMU activates a rule when a *format* driver above fires the
rule's event on the blkdebug node.  pyaioctx has no format drivers, so each
request fires its own events: a read fires ``read_aio``; a write
``write_aio`` and ``pwritev``; a write-zeroes ``write_aio`` and
``pwritev_zero``; a discard ``write_aio`` (QEMU has no discard event); a
flush ``flush_to_os`` and ``flush_to_disk``; a block-status query
``read_aio`` (only rules whose ``iotype`` names ``block-status`` see it).
A rule applies to a request
whose events include the rule's event and whose type is in ``iotype`` --
so with the right event, exactly the targeted requests fail.  Several rules
may be active; the first matching one (in the order given) wins.  Other
QEMU event names are accepted but never fire.
"""

from __future__ import annotations

import errno as _errno
import random
from typing import Any, Optional

from .. import coroutine as _co
from ..iov import QEMUIOVector
from .block import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BDRV_REQ_FUA,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    BlockDriver,
    BlockDriverState,
    bdrv_co_flush,
    bdrv_co_pdiscard,
    bdrv_co_preadv,
    bdrv_co_pwrite_zeroes,
    bdrv_co_pwritev,
    bdrv_co_truncate,
    bdrv_get_aio_context,
    bdrv_getlength,
    bdrv_open_child,
    bdrv_register,
)

__all__ = ["bdrv_blkdebug", "BlkdebugRule", "BDRVBlkdebugState", "BLKDBG_EVENTS",
           "BLKDEBUG_IO_TYPES"]

#: QEMU's BlkdebugEvent names (qapi/block-core.json).
BLKDBG_EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero",
    "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)

#: QEMU's BlkdebugIOType names.
BLKDEBUG_IO_TYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
_DEFAULT_IOTYPES = frozenset(("read", "write", "write-zeroes", "discard", "flush"))

# Which events a request of each type fires (see the module docstring).
_EVENTS_OF = {
    "read": frozenset(("read_aio",)),
    "write": frozenset(("write_aio", "pwritev")),
    "write-zeroes": frozenset(("write_aio", "pwritev_zero")),
    "discard": frozenset(("write_aio",)),
    "flush": frozenset(("flush_to_os", "flush_to_disk")),
    "block-status": frozenset(("read_aio",)),
}

_RULE_KEYS = ("event", "state", "iotype", "errno", "sector", "once", "immediately",
              "probability")
_RUNTIME_OPTS = ("image", "inject-error", "align", "seed", "filename")


class BlkdebugRule:
    """One ``inject-error`` rule (QEMU's ``BlkdebugRule`` with
    ACTION_INJECT_ERROR).  Home thread only."""

    __slots__ = ("event", "iotypes", "error", "offset", "once", "immediately",
                 "probability", "hits")

    def __init__(self, event: str, iotypes: frozenset, error: int, offset: int,
                 once: bool, immediately: bool, probability: float) -> None:
        self.event = event
        self.iotypes = iotypes
        self.error = error
        self.offset = offset          # -1: any request
        self.once = once
        self.immediately = immediately
        self.probability = probability
        self.hits = 0                 # times this rule failed a request

    def __repr__(self) -> str:
        return (f"<BlkdebugRule {self.event} {sorted(self.iotypes)} errno={self.error} "
                f"offset={self.offset} once={self.once} hits={self.hits}>")


class BDRVBlkdebugState:
    """QEMU's ``BDRVBlkdebugState`` (the parts ported)."""

    __slots__ = ("rules", "align", "rng")

    def __init__(self) -> None:
        self.rules: list[BlkdebugRule] = []
        self.align = 0
        self.rng = random.Random()


def _parse_errno(v: Any) -> int:
    if isinstance(v, str):
        code = getattr(_errno, v.upper(), None)
        if not isinstance(code, int):
            raise ValueError(f"blkdebug: unknown errno name {v!r}")
        return code
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"blkdebug: 'errno' must be an int or a name like 'EIO', got {v!r}")
    return abs(v)


def _parse_bool(rule: dict, key: str, default: bool) -> bool:
    v = rule.get(key, default)
    if not isinstance(v, bool):
        raise ValueError(f"blkdebug: '{key}' must be a bool, got {v!r}")
    return v


def _parse_rule(rule: Any, i: int) -> BlkdebugRule:
    # Port of add_rule for inject-error.
    if not isinstance(rule, dict):
        raise ValueError(f"blkdebug: inject-error[{i}] must be a dict, got {type(rule).__name__}")
    for key in rule:
        if key not in _RULE_KEYS:
            raise ValueError(f"blkdebug: inject-error[{i}] has an unknown key '{key}' "
                             f"(known: {', '.join(_RULE_KEYS)})")
    event = rule.get("event")
    if event is None:
        raise ValueError(f"blkdebug: inject-error[{i}] needs an 'event'")
    if event not in BLKDBG_EVENTS:
        raise ValueError(f"blkdebug: inject-error[{i}]: unknown event '{event}'")
    if "state" in rule:
        raise ValueError(f"blkdebug: inject-error[{i}]: 'state' is not supported "
                         f"(pyaioctx has no set-state rules)")
    iotype = rule.get("iotype")
    if iotype is None:
        iotypes = _DEFAULT_IOTYPES
    else:
        names = [iotype] if isinstance(iotype, str) else iotype
        if not isinstance(names, (list, tuple)) or not names:
            raise ValueError(f"blkdebug: inject-error[{i}]: bad iotype {iotype!r}")
        for n in names:
            if n not in BLKDEBUG_IO_TYPES:
                raise ValueError(f"blkdebug: inject-error[{i}]: unknown iotype '{n}' "
                                 f"(known: {', '.join(BLKDEBUG_IO_TYPES)})")
        iotypes = frozenset(names)
    error = _parse_errno(rule.get("errno", _errno.EIO))
    sector = rule.get("sector", -1)
    if isinstance(sector, bool) or not isinstance(sector, int) or sector < -1:
        raise ValueError(f"blkdebug: inject-error[{i}]: 'sector' must be a non-negative int")
    prob = rule.get("probability", 1.0)
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
        raise ValueError(f"blkdebug: inject-error[{i}]: 'probability' must be in [0, 1]")
    return BlkdebugRule(event, iotypes, error, sector * 512 if sector >= 0 else -1,
                        _parse_bool(rule, "once", False), _parse_bool(rule, "immediately", False),
                        float(prob))


def blkdebug_open(bs: BlockDriverState, options: dict, flags: int) -> int:
    """Port of ``blkdebug_open``."""
    s = BDRVBlkdebugState()
    bs.opaque = s
    rules = options.pop("inject-error", [])
    if not isinstance(rules, (list, tuple)):
        raise ValueError("blkdebug: 'inject-error' must be a list of rule dicts")
    s.rules = [_parse_rule(r, i) for i, r in enumerate(rules)]
    seed = options.pop("seed", None)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"blkdebug: 'seed' must be an int, got {seed!r}")
        s.rng.seed(seed)
    align = options.pop("align", 0)
    if isinstance(align, bool) or not isinstance(align, int) or align < 0 or (align & (align - 1)):
        raise ValueError(f"Cannot meet constraints with align {align!r} (must be a power of 2)")
    s.align = align
    image = options.pop("image", None)
    filename = options.pop("filename", None)
    if image is None:
        if filename is None:
            raise ValueError("blkdebug: the 'image' option (the device to wrap) is required")
        image = {"driver": "file", "filename": filename}
    bdrv_open_child(bs, image)
    bs.supported_write_flags = BDRV_REQ_FUA & bs.file.supported_write_flags  # type: ignore[union-attr]
    bs.supported_zero_flags = (BDRV_REQ_FUA | BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK) \
        & bs.file.supported_zero_flags  # type: ignore[union-attr]
    return 0


def blkdebug_refresh_limits(bs: BlockDriverState) -> None:
    """Port of ``blkdebug_refresh_limits``."""
    s: BDRVBlkdebugState = bs.opaque
    if s.align:
        bs.bl.request_alignment = s.align


def blkdebug_getlength(bs: BlockDriverState) -> int:
    """Port of ``blkdebug_co_getlength``."""
    return bdrv_getlength(bs.file)  # type: ignore[arg-type]


def _rule_check(bs: BlockDriverState, offset: int, bytes: int, iotype: str) -> int:
    # Port of rule_check.
    s: BDRVBlkdebugState = bs.opaque
    events = _EVENTS_OF[iotype]
    hit: Optional[BlkdebugRule] = None
    for rule in s.rules:
        if rule.event not in events or iotype not in rule.iotypes:
            continue
        if rule.offset != -1 and not (bytes and offset <= rule.offset < offset + bytes):
            continue
        if rule.probability < 1.0 and s.rng.random() >= rule.probability:
            continue
        hit = rule
        break
    if hit is None or not hit.error:
        return 0
    hit.hits += 1
    if hit.once:
        s.rules.remove(hit)
    if not hit.immediately:
        # Deliver the error asynchronously, as QEMU does.
        _co.aio_co_schedule(bdrv_get_aio_context(bs), _co.qemu_coroutine_self())
        _co.qemu_coroutine_yield()
    return -hit.error


def blkdebug_co_preadv(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                       flags: int) -> int:
    """Port of ``blkdebug_co_preadv``."""
    err = _rule_check(bs, offset, bytes, "read")
    if err:
        return err
    return bdrv_co_preadv(bs.file, offset, bytes, qiov, flags)  # type: ignore[arg-type]


def blkdebug_co_pwritev(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                        flags: int) -> int:
    """Port of ``blkdebug_co_pwritev``."""
    err = _rule_check(bs, offset, bytes, "write")
    if err:
        return err
    return bdrv_co_pwritev(bs.file, offset, bytes, qiov, flags)  # type: ignore[arg-type]


def blkdebug_co_flush(bs: BlockDriverState) -> int:
    """Port of ``blkdebug_co_flush``."""
    err = _rule_check(bs, 0, 0, "flush")
    if err:
        return err
    return bdrv_co_flush(bs.file)  # type: ignore[arg-type]


def blkdebug_co_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int) -> int:
    """Port of ``blkdebug_co_pwrite_zeroes``."""
    err = _rule_check(bs, offset, bytes, "write-zeroes")
    if err:
        return err
    return bdrv_co_pwrite_zeroes(bs.file, offset, bytes, flags)  # type: ignore[arg-type]


def blkdebug_co_pdiscard(bs: BlockDriverState, offset: int, bytes: int) -> int:
    """Port of ``blkdebug_co_pdiscard``."""
    err = _rule_check(bs, offset, bytes, "discard")
    if err:
        return err
    return bdrv_co_pdiscard(bs.file, offset, bytes)  # type: ignore[arg-type]


def blkdebug_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                             bytes: int) -> Any:
    """Port of ``blkdebug_co_block_status``: rules for ``block-status`` may
    fail the query; otherwise the image answers (QEMU's
    ``bdrv_co_block_status_from_file``: ``RAW`` at the same offset)."""
    err = _rule_check(bs, offset, bytes, "block-status")
    if err:
        return err
    return BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs.file


def blkdebug_co_truncate(bs: BlockDriverState, offset: int, exact: bool, prealloc: int,
                         flags: int) -> int:
    """Pass-through resize (QEMU's filters forward truncate to the child)."""
    return bdrv_co_truncate(bs.file, offset, exact, prealloc, flags)  # type: ignore[arg-type]


bdrv_blkdebug = BlockDriver(
    format_name="blkdebug",
    protocol_name="blkdebug",
    runtime_opts=_RUNTIME_OPTS,
    is_filter=True,
    has_variable_length=True,
    bdrv_file_open=blkdebug_open,
    bdrv_refresh_limits=blkdebug_refresh_limits,
    bdrv_getlength=blkdebug_getlength,
    bdrv_co_preadv=blkdebug_co_preadv,
    bdrv_co_pwritev=blkdebug_co_pwritev,
    bdrv_co_flush=blkdebug_co_flush,
    bdrv_co_pwrite_zeroes=blkdebug_co_pwrite_zeroes,
    bdrv_co_pdiscard=blkdebug_co_pdiscard,
    bdrv_co_truncate=blkdebug_co_truncate,
    bdrv_co_block_status=blkdebug_co_block_status,
)
bdrv_register(bdrv_blkdebug)
