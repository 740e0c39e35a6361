"""Records and maps as stored from format v2 on: a header with their length and CRC-32 before
the bytes (as Firecracker seals its snapshots), so a value that is cut short, overwritten or
read back wrong is told apart from a good one even where RocksDB's block checksums cannot see
it (a bad write, a copy made behind RocksDB's back)."""

from __future__ import annotations

import struct
import zlib

MAGIC = b"VCK"  # never the first byte of a v1 value: those are msgpack maps (0x80-0x8f, 0xde)
HEADER = struct.Struct("<3sBII")  # magic, envelope version, payload length, CRC-32 of payload
VERSION = 1


class BadEnvelope(ValueError):
    """str(): what is wrong, as the end of a sentence ("is truncated ...")."""


def seal(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, len(payload), zlib.crc32(payload)) + payload


def unseal(blob: bytes) -> bytes:
    if len(blob) < HEADER.size or blob[:len(MAGIC)] != MAGIC:
        raise BadEnvelope("has no valid header (overwritten)")
    _, version, length, crc = HEADER.unpack_from(blob)
    if version != VERSION:
        raise BadEnvelope(f"has an envelope of version {version} (overwritten)")
    payload = blob[HEADER.size:]
    if len(payload) != length:
        raise BadEnvelope(f"is {len(payload)} bytes where its header says {length} "
                          "(truncated or overwritten)")
    if zlib.crc32(payload) != crc:
        raise BadEnvelope("does not match its checksum (corrupt)")
    return payload
