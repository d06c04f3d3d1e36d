"""Gzip files of mostly-empty volumes in time proportional to their non-zero part.

The output is one ordinary gzip member (RFC 1952) that any reader accepts. Runs of zero bytes
are not compressed again and again: deflate blocks holding 2**n zero bytes are made once and
spliced in. That is valid because every piece ends with a full flush (byte aligned, no
back-references across it), the technique parallel gzip writers use. The CRC-32 of a zero run is
applied with tables derived from zlib's own crc32 (CRC-32 is affine in its start value; the
table for 2**(n+1) zeros is the one for 2**n applied twice), so the zeros are never read.
"""

from __future__ import annotations

import struct
import threading
import zlib
from functools import lru_cache
from typing import BinaryIO, Iterable, Union

import numpy as np

Piece = Union[int, np.ndarray]   # a run of that many zero bytes, or data
_BULK = 20                       # zero runs are made of blocks of at most 2**20 bytes
_lock = threading.Lock()
_crc_tables: list = []           # [n] -> (base, 4 tables) for 2**n zero bytes


def _table_from(f) -> tuple:
    """(base, T0..T3) of the affine map f(c) on 32-bit values."""
    base = f(0)
    cols = [f(1 << b) ^ base for b in range(32)]
    tables = []
    for byte in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v
            t[v] = t[v ^ low] ^ cols[8 * byte + low.bit_length() - 1]
        tables.append(t)
    return base, tables


def _apply(entry, crc: int) -> int:
    base, (t0, t1, t2, t3) = entry
    return base ^ t0[crc & 255] ^ t1[(crc >> 8) & 255] ^ t2[(crc >> 16) & 255] ^ t3[crc >> 24]


def _crc_table(n: int):
    with _lock:
        while len(_crc_tables) <= n:
            if not _crc_tables:
                _crc_tables.append(_table_from(lambda c: zlib.crc32(b"\0", c)))
            else:
                prev = _crc_tables[-1]
                _crc_tables.append(_table_from(lambda c, p=prev: _apply(p, _apply(p, c))))
        return _crc_tables[n]


def crc32_zeros(crc: int, nbytes: int) -> int:
    """``zlib.crc32(bytes(nbytes), crc)`` without reading ``nbytes`` zeros."""
    n = 0
    while nbytes:
        if nbytes & 1:
            crc = _apply(_crc_table(n), crc)
        nbytes >>= 1
        n += 1
    return crc


@lru_cache(maxsize=None)
def _zero_block(n: int, level: int) -> bytes:
    """Raw deflate of 2**n zero bytes ending at a full flush."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    return c.compress(bytes(1 << n)) + c.flush(zlib.Z_FULL_FLUSH)


@lru_cache(maxsize=512)
def _small_zero_run(nbytes: int, level: int) -> bytes:
    return b"".join(_zero_block(n, level) for n in range(_BULK) if nbytes >> n & 1)


def _zero_run(nbytes: int, level: int) -> bytes:
    bulk, rest = divmod(nbytes, 1 << _BULK)
    return _zero_block(_BULK, level) * bulk + _small_zero_run(rest, level)


def write_gzip(fh: BinaryIO, head: bytes, pieces: Iterable[Piece], level: int = 1) -> None:
    """Write gzip(``head`` + pieces) to the binary file ``fh``. A piece is an int (that many zero
    bytes) or a C-contiguous array (its bytes). No file name, mtime 0: same content, same bytes."""
    if not 0 <= level <= 9:
        raise ValueError(f"compression level must be 0..9, got {level}")
    fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + (b"\x04" if level == 1 else b"\x00") + b"\xff")
    comp = zlib.compressobj(level, zlib.DEFLATED, -15)
    crc = zlib.crc32(head)
    size = len(head)
    fh.write(comp.compress(head))
    pending = True                      # the compressor holds data not yet flushed
    zeros = 0                           # zero bytes not yet written

    def flush_zeros():
        nonlocal zeros, pending, crc
        if pending:
            fh.write(comp.flush(zlib.Z_FULL_FLUSH))
            pending = False
        fh.write(_zero_run(zeros, level))
        crc = crc32_zeros(crc, zeros)
        zeros = 0

    for p in pieces:
        if isinstance(p, (int, np.integer)):
            if p < 0:
                raise ValueError("a zero run cannot be negative")
            zeros += int(p)
            size += int(p)
            continue
        if not (isinstance(p, np.ndarray) and p.flags.c_contiguous):
            raise ValueError("data pieces must be C-contiguous arrays")
        if p.nbytes == 0:
            continue
        if zeros:
            flush_zeros()
        buf = p.reshape(-1).view(np.uint8)
        fh.write(comp.compress(buf))
        crc = zlib.crc32(buf, crc)
        size += p.nbytes
        pending = True
    if zeros:
        flush_zeros()
    fh.write(comp.flush(zlib.Z_FINISH))
    fh.write(struct.pack("<II", crc & 0xFFFFFFFF, size & 0xFFFFFFFF))


def volume_pieces(array: np.ndarray, box, slices: np.ndarray | None = None) -> Iterable[Piece]:
    """The C-order bytes of a [k, j, ...] array that is zero outside ``box`` (its (k, j, ...)
    slices from a ``MaskExtent``; None = all zero): zero runs and, per non-empty k-slice, the rows
    ``box[1]`` in full. ``slices`` (bool per k) marks the non-empty k-slices inside the box."""
    row = int(np.prod(array.shape[2:], dtype=np.int64)) * array.itemsize
    plane = array.shape[1] * row
    if box is None:
        yield array.shape[0] * plane
        return
    ks, js = box[0], box[1]
    yield ks.start * plane
    for k in range(ks.start, ks.stop):
        if slices is not None and not slices[k]:
            yield plane
            continue
        yield js.start * row
        yield np.ascontiguousarray(array[k, js])
        yield (array.shape[1] - js.stop) * row
    yield (array.shape[0] - ks.stop) * plane
