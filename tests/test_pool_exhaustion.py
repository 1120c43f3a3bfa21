"""A gateway whose Redis pool is in use to the last connection is busy, not facing a Redis outage:
redis-py's own errors for it, against a real redis-server, are told apart from Redis being away."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import BlockingConnectionPool
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.outage import Outage, pool_exhausted
from tests.support import RedisServer, free_port


def test_a_pool_that_stays_full_is_not_an_outage(redis_server: RedisServer) -> None:
    async def exhaust() -> BaseException:
        pool = BlockingConnectionPool.from_url(redis_server.url, max_connections=1, timeout=0.2)
        client = AsyncRedis(connection_pool=pool)
        held = await pool.get_connection()
        try:
            with pytest.raises(RedisConnectionError) as caught:
                await client.get("anything")
            return caught.value
        finally:
            await pool.release(held)
            await client.aclose()

    error = asyncio.run(exhaust())
    assert pool_exhausted(error)
    outage = Outage()
    outage.failed("answering a request", error)
    assert not outage.down


def test_redis_away_is_an_outage() -> None:
    async def unreachable() -> BaseException:
        client = AsyncRedis.from_url(f"redis://127.0.0.1:{free_port()}/0")
        try:
            with pytest.raises(RedisConnectionError) as caught:
                await client.get("anything")
            return caught.value
        finally:
            await client.aclose()

    error = asyncio.run(unreachable())
    assert not pool_exhausted(error)
    outage = Outage()
    outage.failed("answering a request", error)
    assert outage.down
