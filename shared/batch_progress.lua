#!lua
-- (`#!lua`, no flags: Redis 7 refuses the whole script up front when it cannot take writes, OOM,
-- MISCONF or a read-only replica, rather than letting it stop halfway or write past maxmemory.)
-- A batch's progress: record one child's end (once), and when every child has ended, queue the
-- synthesis (if it is still deferred) or mark the batch ended. Atomic, so however many processes
-- record ends at once, each child's event is written once and the synthesis queued once.
--
-- KEYS[1] the batch record (JSON: children [{job_id, custom_id}], synthesis_job_id, and the keys of
--         the synthesis's queue and deferred registry)
-- KEYS[2] the ended hash (custom id -> 1; field "" once every child has ended)
-- KEYS[3] the batch stream
-- KEYS[4] RQ's set of queue keys
-- KEYS[5] the set of open batches
-- KEYS[6] the wake list idle workers block on
-- KEYS[7] the stream of notices that streams were written (the gateways' stream readers block on it)
-- ARGV[1] the child's custom id, or "" to look at every child's RQ status instead (a sweep)
-- ARGV[2] the child's event (JSON), with ARGV[1]
-- ARGV[3] RQ's timestamp for the synthesis's enqueued_at
-- ARGV[4] TTL of the ended hash and the stream, s
-- ARGV[5] RQ's job key prefix; ARGV[6] the batch id
-- ARGV[7] how long the record is kept once every child has ended, s (none before: the synthesis needs it)
-- ARGV[8] wake tokens kept at most
-- ARGV[9] notices kept, roughly
--
-- Returns "done" once every child has ended, "open" before, "gone" when there is no such batch.

local raw = redis.call("GET", KEYS[1])
if not raw then
  redis.call("SREM", KEYS[5], ARGV[6])
  return "gone"
end
local record = cjson.decode(raw)
local children = record["children"]

local function add(kind, data)
  redis.call("XADD", KEYS[3], "*", "type", kind, "data", data)
  redis.call("XADD", KEYS[7], "MAXLEN", "~", ARGV[9], "*", "k", KEYS[3])
end

local function record_end(custom_id, event)
  if redis.call("HSETNX", KEYS[2], custom_id, 1) == 1 then
    add("child", event)
  end
end

local shown = {finished = "finished", failed = "failed", stopped = "canceled", canceled = "canceled"}

if ARGV[1] ~= "" then
  record_end(ARGV[1], ARGV[2])
else
  for _, child in ipairs(children) do
    if redis.call("HEXISTS", KEYS[2], child["custom_id"]) == 0 then
      local status = redis.call("HGET", ARGV[5] .. child["job_id"], "status")
      local ended = status and shown[status] or (not status and "expired")
      if ended then
        record_end(child["custom_id"], cjson.encode({
          custom_id = child["custom_id"], id = child["job_id"], status = ended
        }))
      end
    end
  end
end
redis.call("EXPIRE", KEYS[2], ARGV[4])
redis.call("EXPIRE", KEYS[3], ARGV[4])

local recorded = redis.call("HLEN", KEYS[2]) - redis.call("HEXISTS", KEYS[2], "")
if recorded < #children then
  return "open"
end
if redis.call("HSETNX", KEYS[2], "", 1) == 0 then
  return "done"
end
redis.call("SREM", KEYS[5], ARGV[6])
redis.call("EXPIRE", KEYS[1], ARGV[7])

local synthesis_id = record["synthesis_job_id"]
if type(synthesis_id) ~= "string" then
  add("end", cjson.encode({status = "completed"}))
  return "done"
end
local job_key = ARGV[5] .. synthesis_id
local status = redis.call("HGET", job_key, "status")
if status == "deferred" then
  local queue_key = record["synthesis_queue_key"]
  redis.call("HSET", job_key, "status", "queued", "enqueued_at", ARGV[3])
  redis.call("ZREM", record["synthesis_registry_key"], synthesis_id)
  redis.call("RPUSH", queue_key, synthesis_id)
  redis.call("SADD", KEYS[4], queue_key)
  redis.call("RPUSH", KEYS[6], 1)
  redis.call("LTRIM", KEYS[6], -tonumber(ARGV[8]), -1)
  status = "queued"
end
add("children_done", cjson.encode({synthesis = {id = synthesis_id, status = status or "expired"}}))
return "done"
