"""Read-only memory maps that hold no file descriptor (parts, the clip index file).

A map does not need its descriptor once made, so none is kept: an output of any number of parts
stays mapped without approaching the open-file limit. Mappings take address space, not memory;
the kernel pages in what is read, so a process that reads a few clips (an array task) pays for
those pages, not for the file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_readonly(path: str) -> np.ndarray:
    """The file's bytes as a read-only array backed by a private memory map whose descriptor is
    already closed (Python's ``mmap`` keeps a duplicate descriptor per map; this does not).
    Unmapped when the array and every view of it are gone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return np.zeros(0, np.uint8)
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)
    return np.asarray(_Mapping(addr, size))


class _Mapping:
    """Owner of one map: numpy arrays over it keep it alive; unmapped when the last one goes.
    (An ``__array_interface__`` rather than a ctypes array: ctypes makes a new type per size.)"""

    def __init__(self, addr: int, size: int):
        self.__array_interface__ = {"data": (addr, True), "shape": (size,), "typestr": "|u1", "version": 3}
        weakref.finalize(self, _libc.munmap, addr, size)
