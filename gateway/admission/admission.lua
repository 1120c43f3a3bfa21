#!lua
-- (`#!lua`, no flags: Redis 7 refuses the whole script up front when it cannot take writes, OOM,
-- MISCONF or a read-only replica, rather than letting it stop halfway or write past maxmemory.)
-- mlxq admission: the checks that need shared state, and the enqueue itself, in one
-- atomic step, so any number of gateways together never admit past a limit.
--
-- KEYS[1]  circuit record (hash: state, next_trial_at_ms)
-- KEYS[2]  worker memory reports (hash: worker -> "used_percent at_ms")
-- KEYS[3]  this client's rate window (zset: request id -> admitted at, ms)
-- KEYS[4]  this client's in-flight jobs of this request's tier (zset: job id -> admitted at, ms)
-- KEYS[5]  recent job ends (zset: job id -> ended at, ms), written by workers
-- KEYS[6]  refusal counters (hash: reason -> count)
-- KEYS[7]  admission counter
-- KEYS[8]  RQ's set of queue keys
-- KEYS[9]  this request's Idempotency-Key record ("hash id"), or a key never written when there is none
-- KEYS[10] the batch record to write, or a key never written when this is not a batch
-- KEYS[11] batch-tier owners (hash: job id -> client tag)
-- KEYS[12] batch-tier ring (list of client tags with waiting jobs, in serving order)
-- KEYS[13] this client's batch-tier turns (list of its waiting job ids)
-- KEYS[14] the wake list (an idle worker blocks on it)
-- KEYS[15] open batches (set of batch ids)
-- KEYS[16] worker capacities (hash: worker -> "jobs_per_s at_ms"), written by workers
-- KEYS[17..] every queue whose depth counts towards the limit
--
-- Limits are not arguments: Admission writes them into the script as constants
-- (`{{name}}` below), one fewer thing to pack and send per request.
--
-- ARGV[1] number of jobs n
-- ARGV[2] the request's hash for its Idempotency-Key ("" when there is none); ARGV[3] the id to
--         remember for it (a job's or a batch's); ARGV[4] how long to remember it, ms
-- ARGV[5] the tier: "single" (interactive and normal jobs) or "batch" (served in turns by client)
-- ARGV[6] the client's tag in the batch-tier ring
-- ARGV[7] the request's id in the rate window: a request counts once, however many jobs it has
-- ARGV[8] the batch id ("" when this is not a batch); ARGV[9] its record (JSON)
-- ARGV[10] a deferred job (the batch's synthesis) as netstrings: id, deferred registry key,
--          hash field/value pairs; "" when there is none
-- ARGV[11..] one argument per job, netstrings ("len:bytes,") of its id,
--          queue key and hash field/value pairs (one argument, not dozens: redis-py packs
--          commands in time quadratic in their argument count)
--
-- Returns {"ok", limit, remaining, reset_ms}, {"duplicate", 0, id, ""} for a repeated
-- Idempotency-Key with the same request, or {reason, retry_after_s, detail1, detail2};
-- details are strings, since Redis would truncate a Lua number to an integer.
-- RQ's job hash and queue push are written exactly as rq's own unique-enqueue script does.

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local rate_limit = {{rate_limit}}            -- requests per window
local rate_window = {{rate_window_ms}}
local max_queued = {{max_queued}}            -- jobs in all counted queues
local emergency = {{emergency_percent}}      -- memory used, percent
local fresh_ms = {{fresh_ms}}                -- a memory report older than this is from a dead worker
local drain_window = {{drain_window_ms}}
local fallback_retry = {{fallback_retry_s}}  -- Retry-After when nothing drained in the window
local memory_retry = {{memory_retry_s}}
local job_prefix = "{{job_prefix}}"
local inflight_ttl = {{inflight_ttl_ms}}
local wake_max = {{wake_max}}
local n = tonumber(ARGV[1])
local tier = ARGV[5]
local max_inflight = {{max_inflight}}        -- single-tier jobs per client, queued or running
if tier == "batch" then
  max_inflight = {{max_batch_inflight}}      -- batch-tier jobs per client, queued or running
end

local function netstrings(packed)
  local out, i = {}, 1
  while i <= #packed do
    local colon = string.find(packed, ":", i, true)
    local size = tonumber(string.sub(packed, i, colon - 1))
    out[#out + 1] = string.sub(packed, colon + 1, colon + size)
    i = colon + size + 2
  end
  return out
end

local function refuse(reason, retry_after, a, b)
  redis.call("HINCRBY", KEYS[6], reason, 1)
  return {reason, math.max(1, math.ceil(retry_after)), tostring(a or ""), tostring(b or "")}
end

-- Seconds until `excess` more jobs have drained: at the faster of the rate jobs ended lately (the
-- last RECENT_ENDS of the window, so a burst is not diluted by a quiet hour) and what the workers
-- say they can drain (their batch over their recent jobs' duration), which holds while jobs have
-- only just started and none has ended yet.
local RECENT_ENDS = 32
local CAPACITY_FRESH_MS = 600000
local function drain_eta(excess)
  redis.call("ZREMRANGEBYSCORE", KEYS[5], "-inf", now - drain_window)
  local rate = 0
  local recent = redis.call("ZRANGE", KEYS[5], -RECENT_ENDS, -1, "WITHSCORES")
  if #recent > 0 then
    local oldest = tonumber(recent[2])
    rate = (#recent / 2) / math.max(1, (now - oldest) / 1000)
  end
  local capacity = 0
  local reports = redis.call("HGETALL", KEYS[16])
  for i = 2, #reports, 2 do
    local per_s, at = string.match(reports[i], "^(%S+) (%d+)$")
    if per_s and now - tonumber(at) <= CAPACITY_FRESH_MS then
      capacity = capacity + tonumber(per_s)
    end
  end
  rate = math.max(rate, capacity)
  if rate <= 0 then
    return fallback_retry
  end
  return math.min(3600, excess / rate)
end

-- 0. a repeated Idempotency-Key: the same request gets what it got the first time, before any
-- limit is looked at; a different request under the same key is refused
local idem_hash = ARGV[2]
if idem_hash ~= "" then
  local seen = redis.call("GET", KEYS[9])
  if seen then
    local hash, id = string.match(seen, "^(%S+) (%S+)$")
    if hash == idem_hash then
      return {"duplicate", 0, id, ""}
    end
    redis.call("HINCRBY", KEYS[6], "idempotency_conflict", 1)
    return {"idempotency_conflict", 0, id, ""}
  end
end

-- 1. a call made again by the client library (its connection broke after Redis ran it): the jobs are
-- in already, and are not written twice
if ARGV[8] ~= "" and redis.call("EXISTS", KEYS[10]) == 1 then
  return {"duplicate", 0, ARGV[8], ""}
end
if ARGV[8] == "" and n > 0 then
  local first = netstrings(ARGV[11])[1]
  if redis.call("EXISTS", job_prefix .. first) == 1 then
    return {"duplicate", 0, first, ""}
  end
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

-- 5-7 are all looked at, and a refusal names the one that frees last: its Retry-After is
-- then the earliest moment at which every limit lets this request through.
local worst_refusal = nil
local function consider(reason, retry_after, a, b)
  if worst_refusal == nil or retry_after > worst_refusal[2] then
    worst_refusal = {reason, retry_after, a, b}
  end
end

-- 5. per-client rate, a sliding window of admitted requests (a batch is one request)
redis.call("ZREMRANGEBYSCORE", KEYS[3], "-inf", now - rate_window)
local used = redis.call("ZCARD", KEYS[3])
if used + 1 > rate_limit then
  -- the (used + 1 - limit)-th oldest admission must leave the window
  local entry = redis.call("ZRANGE", KEYS[3], used - rate_limit, used - rate_limit, "WITHSCORES")
  local free_at = tonumber(entry[2]) + rate_window
  local newest = redis.call("ZRANGE", KEYS[3], -1, -1, "WITHSCORES")
  local reset = newest[2] and (tonumber(newest[2]) + rate_window - now) or 0
  consider("rate_limited", (free_at - now) / 1000, math.max(0, rate_limit - used), reset)
end

-- Jobs waiting in each queue: the batch tier's queue is the last counted one.
local depth, ahead = 0, 0
for i = 17, #KEYS do
  local waiting = redis.call("LLEN", KEYS[i])
  depth = depth + waiting
  if i < #KEYS then ahead = ahead + waiting end
end

-- 6. per-client in-flight cap of this tier. Members of jobs that have ended (or expired) are
-- dropped lazily: the two oldest on every call, all of them only when the cap would refuse, so
-- the work per call stays bounded by the cap, not by how much the client ever sent.
local function ended(id)
  local status = redis.call("HGET", job_prefix .. id, "status")
  return status ~= "queued" and status ~= "started" and status ~= "deferred"
     and status ~= "scheduled" and status ~= "created"
end
local function prune(ids)
  for _, id in ipairs(ids) do
    if ended(id) then redis.call("ZREM", KEYS[4], id) end
  end
end
prune(redis.call("ZRANGE", KEYS[4], 0, 1))
local inflight = redis.call("ZCARD", KEYS[4])
if inflight + n > max_inflight then
  prune(redis.call("ZRANGE", KEYS[4], 0, -1))
  inflight = redis.call("ZCARD", KEYS[4])
end
if inflight + n > max_inflight then
  -- An upper bound, so that waiting it is enough: the client's excess jobs may be behind every
  -- interactive and normal job waiting now, and batch-tier jobs are served one turn in every
  -- `clients waiting` turns.
  local excess = inflight + n - max_inflight
  if tier == "batch" then
    excess = excess * math.max(1, redis.call("LLEN", KEYS[12]))
  end
  consider("too_many_inflight", drain_eta(excess + ahead), inflight, max_inflight)
end

-- 7. total queue depth; each open batch may still add its synthesis
depth = depth + redis.call("SCARD", KEYS[15])
if depth + n > max_queued then
  consider("queue_full", drain_eta(depth + n - max_queued), depth, max_queued)
end

if worst_refusal ~= nil then
  return refuse(worst_refusal[1], worst_refusal[2], worst_refusal[3], worst_refusal[4])
end

-- admitted: write every job as RQ would and push it; batch-tier jobs also join their
-- client's turns, and the client joins the ring if it was not waiting already
for a = 11, 10 + n do
  local job = netstrings(ARGV[a])
  local id, queue_key = job[1], job[2]
  redis.call("HSET", job_prefix .. id, unpack(job, 3))
  redis.call("RPUSH", queue_key, id)
  redis.call("SADD", KEYS[8], queue_key)
  redis.call("ZADD", KEYS[4], now, id)
  if tier == "batch" then
    redis.call("HSET", KEYS[11], id, ARGV[6])
    if redis.call("RPUSH", KEYS[13], id) == 1 then
      redis.call("RPUSH", KEYS[12], ARGV[6])
    end
  end
end
redis.call("RPUSH", KEYS[14], 1)
redis.call("LTRIM", KEYS[14], -wake_max, -1)
if ARGV[8] ~= "" then
  -- no expiry while the batch is open (its synthesis waits on it); batch_progress.lua sets one at the end
  redis.call("SET", KEYS[10], ARGV[9])
  redis.call("SADD", KEYS[15], ARGV[8])
end
if ARGV[10] ~= "" then
  local job = netstrings(ARGV[10])
  redis.call("HSET", job_prefix .. job[1], unpack(job, 3))
  redis.call("ZADD", job[2], now / 1000, job[1])
end
redis.call("ZADD", KEYS[3], now, ARGV[7])
redis.call("PEXPIRE", KEYS[3], rate_window)
redis.call("PEXPIRE", KEYS[4], inflight_ttl)
redis.call("INCRBY", KEYS[7], n)
if idem_hash ~= "" then
  redis.call("SET", KEYS[9], idem_hash .. " " .. ARGV[3], "PX", ARGV[4])
end
return {"ok", rate_limit, rate_limit - used - 1, rate_window}
