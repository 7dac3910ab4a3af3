# SPDX-License-Identifier: GPL-2.0-or-later
"""Private kernel-interface layer: the only code that touches ctypes.

``libc``          libc handle, syscall numbers, ``-errno`` conventions
``aio_abi``       struct iocb / io_event / aio_ring and the io_* syscalls
``io_uring_abi``  io_uring structs, ring mapping, io_uring_* syscalls
``mem``           aligned, buffer-protocol memory for O_DIRECT
"""
