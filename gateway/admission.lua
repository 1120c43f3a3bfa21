-- mlxq admission: the checks that need shared state, and the enqueue itself, in one
-- atomic step, so any number of gateways together never admit past a limit.
--
-- KEYS[1]  circuit record (hash: state, next_trial_at_ms)
-- KEYS[2]  worker memory reports (hash: worker -> "used_percent at_ms")
-- KEYS[3]  this client's rate window (zset: request id -> admitted at, ms)
-- KEYS[4]  this client's in-flight jobs (zset: job id -> admitted at, ms)
-- KEYS[5]  recent job ends (zset: job id -> ended at, ms), written by workers
-- KEYS[6]  refusal counters (hash: reason -> count)
-- KEYS[7]  admission counter
-- KEYS[8]  RQ's set of queue keys
-- KEYS[9..] every queue whose depth counts towards the limit
--
-- ARGV[1]  rate limit (requests per window)      ARGV[2]  rate window, ms
-- ARGV[3]  in-flight cap per client              ARGV[4]  queue depth limit
-- ARGV[5]  memory emergency, percent             ARGV[6]  memory report freshness, ms
-- ARGV[7]  drain-rate window, ms                 ARGV[8]  Retry-After when no drain was measured, s
-- ARGV[9]  memory Retry-After, s                 ARGV[10] RQ job key prefix ("rq:job:")
-- ARGV[11] in-flight record expiry, ms
-- ARGV[12] number of jobs n; then for each job: id, queue key, field count f, f field/value pairs
--
-- Returns {"ok", limit, remaining, reset_ms} or {reason, retry_after_s, detail1, detail2};
-- details are strings, since Redis would truncate a Lua number to an integer.
-- RQ's job hash and queue push are written exactly as rq's own unique-enqueue script does.

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rate_limit = tonumber(ARGV[1])
local rate_window = tonumber(ARGV[2])
local max_inflight = tonumber(ARGV[3])
local max_queued = tonumber(ARGV[4])
local emergency = tonumber(ARGV[5])
local fresh_ms = tonumber(ARGV[6])
local drain_window = tonumber(ARGV[7])
local fallback_retry = tonumber(ARGV[8])
local memory_retry = tonumber(ARGV[9])
local job_prefix = ARGV[10]
local inflight_ttl = tonumber(ARGV[11])
local n = tonumber(ARGV[12])

local function refuse(reason, retry_after, a, b)
  redis.call("HINCRBY", KEYS[6], reason, 1)
  return {reason, math.max(1, math.ceil(retry_after)), tostring(a or ""), tostring(b or "")}
end

-- Seconds until `excess` more jobs have drained, at the measured rate of the last window.
local function drain_eta(excess)
  redis.call("ZREMRANGEBYSCORE", KEYS[5], "-inf", now - drain_window)
  local ended = redis.call("ZCOUNT", KEYS[5], "-inf", "+inf")
  if ended == 0 then
    return fallback_retry
  end
  local oldest = tonumber(redis.call("ZRANGE", KEYS[5], 0, 0, "WITHSCORES")[2])
  local span_s = math.max(1, (now - oldest) / 1000)
  return math.min(3600, excess / (ended / span_s))
end

-- 3. circuit breaker
local circuit = redis.call("HMGET", KEYS[1], "state", "next_trial_at_ms")
if circuit[1] == "open" then
  local next_trial = tonumber(circuit[2]) or now
  return refuse("circuit_open", (next_trial - now) / 1000)
end

-- 4. memory: refuse only when every worker that reported recently is in emergency
local reports = redis.call("HGETALL", KEYS[2])
local fresh, critical, worst = 0, 0, 0
for i = 2, #reports, 2 do
  local percent, at = string.match(reports[i], "^(%S+) (%S+)$")
  percent, at = tonumber(percent), tonumber(at)
  if percent and at and now - at <= fresh_ms then
    fresh = fresh + 1
    if percent >= emergency then critical = critical + 1 end
    if percent > worst then worst = percent end
  end
end
if fresh > 0 and critical == fresh then
  return refuse("insufficient_memory", memory_retry, worst, emergency)
end

-- 5. per-client rate, a sliding window of admitted requests
redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", now - rate_window)
local used = redis.call("ZCARD", KEYS[3])
if used + n > rate_limit then
  local free_at
  if n > rate_limit then
    free_at = now + rate_window
  else
    -- the (used + n - limit)-th oldest admission must leave the window
    local entry = redis.call("ZRANGE", KEYS[3], used + n - rate_limit - 1, used + n - rate_limit - 1, "WITHSCORES")
    free_at = tonumber(entry[2]) + rate_window
  end
  local newest = redis.call("ZRANGE", KEYS[3], -1, -1, "WITHSCORES")
  local reset = newest[2] and (tonumber(newest[2]) + rate_window - now) or 0
  return refuse("rate_limited", (free_at - now) / 1000, math.max(0, rate_limit - used), reset)
end

-- 6. per-client in-flight cap; forget jobs that ended (or expired) since they were admitted
local inflight_ids = redis.call("ZRANGE", KEYS[4], 0, -1)
for _, id in ipairs(inflight_ids) do
  local status = redis.call("HGET", job_prefix .. id, "status")
  if status ~= "queued" and status ~= "started" and status ~= "deferred"
     and status ~= "scheduled" and status ~= "created" then
    redis.call("ZREM", KEYS[4], id)
  end
end
local inflight = redis.call("ZCARD", KEYS[4])
if inflight + n > max_inflight then
  return refuse("too_many_inflight", drain_eta(inflight + n - max_inflight), inflight, max_inflight)
end

-- 7. total queue depth
local depth = 0
for i = 9, #KEYS do
  depth = depth + redis.call("LLEN", KEYS[i])
end
if depth + n > max_queued then
  return refuse("queue_full", drain_eta(depth + n - max_queued), depth, max_queued)
end

-- admitted: write every job as RQ would and push it
local a = 13
for _ = 1, n do
  local id, queue_key, fields = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local job_key = job_prefix .. id
  redis.call("HSET", job_key, unpack(ARGV, a + 3, a + 2 + 2 * fields))
  redis.call("RPUSH", queue_key, id)
  redis.call("SADD", KEYS[8], queue_key)
  redis.call("ZADD", KEYS[3], now, id)
  redis.call("ZADD", KEYS[4], now, id)
  a = a + 3 + 2 * fields
end
redis.call("PEXPIRE", KEYS[3], rate_window)
redis.call("PEXPIRE", KEYS[4], inflight_ttl)
redis.call("INCRBY", KEYS[7], n)
return {"ok", rate_limit, rate_limit - used - n, rate_window}
