"""The peer for scripts/bench_admission: the least a FastAPI endpoint backed by Redis can do."""

from __future__ import annotations

import os

from fastapi import FastAPI
from redis.asyncio import Redis

app = FastAPI()
redis = Redis.from_url(os.environ["MLXQ_REDIS_URL"])


@app.post("/incr", status_code=202)
async def incr() -> dict[str, int]:
    return {"n": await redis.incr("bench:peer")}
