"""Length-prefixed MessagePack frames with a size cap checked before anything is decoded.

A frame is a 4-byte big-endian body length followed by the body: one msgspec-encoded message
of a tagged union. The length is checked against the cap as soon as its 4 bytes arrive, so an
oversize frame costs the receiver 4 bytes, never an allocation of the claimed size. Every
failure is a typed :class:`~symbiote.schema.mesh.FrameError` and is counted in
:class:`FrameStats`; the caller closes the connection, since after a bad frame the stream can
no longer be trusted to be aligned on frame boundaries.
"""

from __future__ import annotations

import struct
import typing
from collections import Counter
from typing import Any, Generic, TypeVar

import msgspec
import trio

from symbiote.schema.mesh import (
    FrameError,
    FrameTooLarge,
    FrameTruncated,
    MalformedFrame,
    UnknownMessageType,
)

__all__ = ["HEADER_SIZE", "FrameCodec", "FrameReader", "FrameStats", "receive_frame"]

HEADER_SIZE = 4
_HEADER = struct.Struct(">I")
#: Largest read from the socket at once; with the cap it bounds the receive buffer.
_READ_CHUNK = 64 * 1024

T = TypeVar("T")


class FrameStats:
    """Counters of one codec (or one connection): frames, bytes and errors by code."""

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: Keys are FrameError codes, a small closed set, so the counter stays bounded.
        self.errors: Counter[str] = Counter()

    def count_error(self, err: FrameError) -> FrameError:
        """Count ``err`` and return it (so ``raise stats.count_error(...)`` reads well)."""
        self.errors[err.code] += 1
        return err

    def snapshot(self) -> dict[str, Any]:
        """The counters as plain data."""
        return {
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "errors": dict(self.errors),
        }


def _known_tags(type_: Any) -> frozenset[str]:
    tags: set[str] = set()
    for member in typing.get_args(type_) or (type_,):
        tag = getattr(getattr(member, "__struct_config__", None), "tag", None)
        if isinstance(tag, str):
            tags.add(tag)
    return frozenset(tags)


class FrameCodec(Generic[T]):
    """Encodes and decodes frames of one message type (usually a tagged union)."""

    def __init__(self, type_: Any, *, max_frame: int, stats: FrameStats | None = None) -> None:
        if max_frame < 1 or max_frame >= 1 << 32:
            raise ValueError("max_frame must be in 1..2**32-1")
        self.max_frame = max_frame
        self.stats = stats if stats is not None else FrameStats()
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(type_)
        self._tags = _known_tags(type_)

    def encode(self, msg: T) -> bytes:
        """One frame (header and body); raise FrameTooLarge rather than send an oversize one."""
        body = self._encoder.encode(msg)
        if len(body) > self.max_frame:
            raise self.stats.count_error(
                FrameTooLarge(
                    f"outgoing frame of {len(body)} B exceeds {self.max_frame} B", field="frame"
                )
            )
        self.stats.frames_out += 1
        self.stats.bytes_out += HEADER_SIZE + len(body)
        return _HEADER.pack(len(body)) + body

    def check_length(self, length: int) -> None:
        """Raise FrameTooLarge if a header announces more than the cap."""
        if length > self.max_frame:
            raise self.stats.count_error(
                FrameTooLarge(f"frame of {length} B exceeds {self.max_frame} B", field="frame")
            )

    def decode_body(self, body: bytes | memoryview) -> T:
        """Decode one frame body into a message; every failure is a counted FrameError."""
        self.check_length(len(body))
        try:
            msg = self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise self.stats.count_error(self._classify(body, exc)) from exc
        except msgspec.DecodeError as exc:
            err: FrameError
            if "truncated" in str(exc):
                err = FrameTruncated(f"frame body is truncated: {exc}", field="frame")
            else:
                err = MalformedFrame(f"frame body is not MessagePack: {exc}", field="frame")
            raise self.stats.count_error(err) from exc
        self.stats.frames_in += 1
        self.stats.bytes_in += HEADER_SIZE + len(body)
        return msg

    def _classify(self, body: bytes | memoryview, exc: msgspec.ValidationError) -> FrameError:
        # Only on the error path: look at the raw tag to tell "a message type we do not know"
        # (a newer peer, or a probe) from "a known type with bad fields".
        try:
            raw = msgspec.msgpack.decode(body)
        except msgspec.DecodeError:
            raw = None
        tag: object = None
        if isinstance(raw, list) and raw:
            tag = raw[0]
        elif isinstance(raw, dict):
            tag = raw.get("type")
        if isinstance(tag, str) and tag not in self._tags:
            return UnknownMessageType(f"unknown message type {tag[:64]!r}", field="type")
        return MalformedFrame(f"invalid message: {exc}", field="frame")


class FrameReader(Generic[T]):
    """Incremental frame parser; its buffer never exceeds one capped frame plus one read."""

    def __init__(self, codec: FrameCodec[T]) -> None:
        self.codec = codec
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        self._buf += data

    def next_message(self) -> T | None:
        """The next complete message, or None if more bytes are needed."""
        if len(self._buf) < HEADER_SIZE:
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        self.codec.check_length(length)  # before waiting for, or buffering, the body
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        body = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return self.codec.decode_body(body)

    def need(self) -> int:
        """How many more bytes the current frame needs (at least 1)."""
        if len(self._buf) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buf)
        length: int = _HEADER.unpack_from(self._buf)[0]
        return max(1, HEADER_SIZE + length - len(self._buf))

    def eof(self) -> None:
        """The stream ended: raise FrameTruncated if a frame was cut in the middle."""
        if self._buf:
            raise self.codec.stats.count_error(
                FrameTruncated(
                    f"stream ended inside a frame ({len(self._buf)} B pending)", field="frame"
                )
            )


async def receive_frame(stream: trio.abc.ReceiveStream, reader: FrameReader[T]) -> T | None:
    """Read the next message from ``stream``; None on a clean end of stream."""
    while True:
        msg = reader.next_message()
        if msg is not None:
            return msg
        data = await stream.receive_some(min(_READ_CHUNK, max(reader.need(), 4096)))
        if not data:
            reader.eof()
            return None
        reader.feed(data)
