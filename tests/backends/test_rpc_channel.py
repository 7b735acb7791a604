"""The pipe to the engine child (`backends/rpc_child/channel.py`): records of any size arrive
whole and in order, a descriptor passes across with its record, and a peer that went away is
ChannelClosed."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from kodkod.backends.rpc_child.channel import Channel, ChannelClosed, Done, KvSave


def test_the_channel_frames_records_and_passes_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    try:
        big = Done(bytearray(os.urandom(3 * 1024 * 1024)))  # larger than a socket buffer
        r, w = os.pipe()
        try:
            sender = threading.Thread(
                target=lambda: (left.send(KvSave(7)), left.send(big), left.send(Done(), [w]))
            )
            sender.start()
            assert right.recv() == KvSave(7)
            assert right.recv() == big
            record, fds = right.recv_with_fds()
            sender.join()
            assert record == Done() and len(fds) == 1
            os.write(fds[0], b"x")
            assert os.read(r, 1) == b"x"  # the same pipe, passed across
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
        left.close()
        with pytest.raises(ChannelClosed):
            right.recv()
    finally:
        right.close()
