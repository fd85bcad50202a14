"""The day's auditor reads each entry once, however its rounds overlap."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.keys import KeySpace
from tests.system.auditor import Auditor

pytestmark = pytest.mark.cluster


async def test_overlapping_rounds_read_each_entry_once(cluster):
    """The poll loop and the driver's catch-up both call read_once; reading from the same
    last ids at once, both appended what they read (83,009 frames of a full-size day were
    reported "stored twice" that Redis held once)."""
    cluster.flushall()
    keys = KeySpace().bot("audited")
    client = aioredis.RedisCluster.from_url(cluster.url)
    try:
        for seq in range(50):
            await client.xadd(keys.audio, {"conn": "c", "seq": seq, "pcm": b"\x00" * 64})
    finally:
        await client.aclose()
    auditor = Auditor(lambda: cluster.url, ["audited"])
    try:
        await asyncio.gather(*(auditor.read_once() for _ in range(4)))
    finally:
        await auditor.stop()
    assert [f.seq for f in auditor.bots["audited"].frames] == list(range(50))
