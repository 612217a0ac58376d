"""Frames: round trip, oversize before decoding, truncated, unknown type, malformed."""

from __future__ import annotations

import struct

import msgspec
import pytest
import trio
import trio.testing

from symbiote.actors.mesh.frames import FrameCodec, FrameReader, receive_frame
from symbiote.schema.errors import TooLarge
from symbiote.schema.mesh import (
    Ack,
    Alive,
    FrameTooLarge,
    FrameTruncated,
    Gossip,
    MalformedFrame,
    MeshMessage,
    Ping,
    Suspect,
    UnknownMessageType,
)


def codec(max_frame: int = 1024) -> FrameCodec[MeshMessage]:
    return FrameCodec(MeshMessage, max_frame=max_frame)


def test_round_trip_of_tagged_union_in_pieces():
    c = codec()
    msgs: list[MeshMessage] = [
        Ping(seq=1, target="b", updates=[Alive("a", 3, "h:1"), Suspect("c", 2, "a")]),
        Ack(seq=1),
        Gossip(updates=[]),
    ]
    data = b"".join(c.encode(m) for m in msgs)
    reader = FrameReader(c)
    out = []
    for i in range(len(data)):  # one byte at a time: every split point is exercised
        reader.feed(data[i : i + 1])
        while (m := reader.next_message()) is not None:
            out.append(m)
    assert out == msgs
    assert c.stats.frames_in == 3 and not c.stats.errors
    reader.eof()  # nothing pending: a clean end


def test_oversize_header_rejected_before_body_arrives():
    c = codec(max_frame=100)
    reader = FrameReader(c)
    reader.feed(struct.pack(">I", 10_000_000))  # only the header: no body sent at all
    with pytest.raises(FrameTooLarge) as err:
        reader.next_message()
    assert isinstance(err.value, TooLarge)  # also the generic "too large" class
    assert c.stats.errors["frame_too_large"] == 1
    assert reader.buffered == 4  # nothing of the claimed size was allocated


def test_oversize_outgoing_frame_is_not_sent():
    c = codec(max_frame=64)
    with pytest.raises(FrameTooLarge):
        c.encode(Gossip(updates=[Alive("x" * 40, 1, "y" * 40)]))


def test_truncated_stream_and_truncated_body():
    c = codec()
    frame = c.encode(Ack(seq=7))
    reader = FrameReader(c)
    reader.feed(frame[:-1])
    assert reader.next_message() is None
    with pytest.raises(FrameTruncated):
        reader.eof()
    # A header that claims fewer bytes than the message needs: the body itself is cut.
    body = frame[4:]
    with pytest.raises(FrameTruncated):
        c.decode_body(body[:-1])
    assert c.stats.errors["frame_truncated"] == 2


def test_unknown_type_and_malformed_are_distinguished():
    c = codec()
    with pytest.raises(UnknownMessageType):
        c.decode_body(msgspec.msgpack.encode(["launch_missiles", 1]))
    with pytest.raises(MalformedFrame):
        c.decode_body(msgspec.msgpack.encode(["ping", "not-an-int", "b", []]))
    with pytest.raises(MalformedFrame):
        c.decode_body(b"\xc1\xc1\xc1")  # 0xc1 is never valid MessagePack
    with pytest.raises(MalformedFrame):
        c.decode_body(msgspec.msgpack.encode({"no": "tag"}))
    assert c.stats.errors == {"unknown_message": 1, "malformed_frame": 3}


async def test_receive_frame_over_a_stream():
    c = codec()
    send, recv = trio.testing.memory_stream_pair()
    reader = FrameReader(c)
    await send.send_all(c.encode(Ack(seq=1)) + c.encode(Ack(seq=2))[:3])
    assert await receive_frame(recv, reader) == Ack(seq=1)
    await send.aclose()
    with pytest.raises(FrameTruncated):
        await receive_frame(recv, reader)

    send, recv = trio.testing.memory_stream_pair()
    reader = FrameReader(c)
    await send.send_all(c.encode(Ack(seq=3)))
    await send.aclose()
    assert await receive_frame(recv, reader) == Ack(seq=3)
    assert await receive_frame(recv, reader) is None
