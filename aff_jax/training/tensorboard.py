"""TensorBoard event files of scalars, written and read without TensorFlow or tensorboardX.

tensorboardX imports PyTorch whenever it is installed (2-5 s at every start of a run, for a
few numbers), so the little of the format a run needs is encoded here:

* an event file is a sequence of TFRecords: ``uint64 length``, ``uint32 masked CRC-32C of the
  length``, the record, ``uint32 masked CRC-32C of the record`` (little endian);
* each record is an ``Event`` protobuf: 1 ``wall_time`` (double), 2 ``step`` (int64),
  3 ``file_version`` (string), 5 ``summary`` (``Summary``: repeated 1 ``value``, each with
  1 ``tag`` and 2 ``simple_value`` (float)), 7 ``session_log`` (1 ``status``, 1 = START).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import socket
import struct
import time
from typing import Iterator

from aff_jax.training.errors import writing

FILE_VERSION = 'brain.Event:2'
_SESSION_START = 1


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 values are ten-byte two's complement varints
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(step: int, wall_time: float, *, scalars: dict[str, float] | None = None,
                 file_version: str | None = None, session_start: bool = False) -> bytes:
    """One serialized ``Event`` (fields in field-number order, as protobuf writes them)."""
    out = _varint(1 << 3 | 1) + struct.pack('<d', wall_time)
    if step:
        out += _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b''.join(
            _length_delimited(1, _length_delimited(1, tag.encode())
                              + _varint(2 << 3 | 5) + struct.pack('<f', value))
            for tag, value in scalars.items())
        out += _length_delimited(5, values)
    if session_start:
        out += _length_delimited(7, _varint(1 << 3) + _varint(_SESSION_START))
    return out


def frame(record: bytes) -> bytes:
    """``record`` in TFRecord framing."""
    length = struct.pack('<Q', len(record))
    return length + _masked_crc(length) + record + _masked_crc(record)


class EventWriter:
    """Appends scalar events to a new file ``directory/events.out.tfevents.<time>.<host>.<pid>``.

    ``purge_step`` (a resumed run's start): a session-start event at that step, which tells
    TensorBoard to drop the events of earlier attempts after it, as tensorboardX's
    ``SummaryWriter(purge_step=...)`` does. Each write is flushed, so a killed run loses
    nothing it logged.
    """

    def __init__(self, directory: pathlib.Path, purge_step: int | None = None):
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / (f'events.out.tfevents.{int(now)}.{socket.gethostname()}.'
                                 f'{os.getpid()}')
        self._file = self.path.open('ab')
        self._write(encode_event(0, now, file_version=FILE_VERSION))
        if purge_step is not None:
            self._write(encode_event(purge_step, now, file_version=FILE_VERSION))
            self._write(encode_event(purge_step, now, session_start=True))

    def _write(self, record: bytes) -> None:
        with writing(self.path):
            self._file.write(frame(record))
            self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """One event per tag, as ``add_scalar`` writes them."""
        now = time.time()
        for tag, value in values.items():
            self._write(encode_event(step, now, scalars={tag: value}))

    def close(self) -> None:
        self._file.close()


@dataclasses.dataclass(frozen=True)
class Event:
    step: int
    wall_time: float
    scalars: dict[str, float]


def read_events(path: pathlib.Path) -> Iterator[Event]:
    """The events of a file, stopping quietly at a record a running writer has not finished.
    Checksums are not verified (the file is our own; a torn tail is the only damage seen)."""
    data = path.read_bytes()
    offset = 0
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from('<Q', data, offset)
        record = data[offset + 12:offset + 12 + length]
        offset += 16 + length
        if offset > len(data):
            return
        event = _fields(record)
        scalars = {}
        for summary in event.get(5, []):
            for value in _fields(summary).get(1, []):
                value_fields = _fields(value)
                if 2 in value_fields:
                    scalars[value_fields[1][0].decode()] = struct.unpack('<f', value_fields[2][0])[0]
        wall_time = struct.unpack('<d', event[1][0])[0] if 1 in event else 0.0
        yield Event(event.get(2, [0])[0], wall_time, scalars)


def _fields(message: bytes) -> dict[int, list]:
    """Field number -> values of a serialized protobuf message: ints for varints, bytes for
    the other wire types (64-bit, length-delimited, 32-bit)."""
    fields: dict[int, list] = {}
    i = 0
    while i < len(message):
        key, i = _read_varint(message, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(message, i)
        elif wire == 2:
            size, i = _read_varint(message, i)
            value, i = message[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = message[i:i + size], i + size
        else:
            raise ValueError(f'unsupported protobuf wire type {wire}')
        fields.setdefault(number, []).append(value)
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i
