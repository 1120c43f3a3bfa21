-- A worker claims its next job: the first job of the highest-priority queue, except that the
-- batch tier (the last queue) is served in turns by client (round robin), so one client's wide
-- fan-out cannot starve another's that arrived later.
--
-- KEYS[1..#KEYS-3] the plain queues, highest priority first (first come, first served)
-- KEYS[#KEYS-2]    the batch queue (RQ's list: every batch-tier job, in arrival order)
-- KEYS[#KEYS-1]    owners (hash: job id -> client tag) of batch jobs that wait their client's turn
-- KEYS[#KEYS]      the ring of client tags with waiting batch jobs, next to serve first
-- ARGV[1]          prefix of a client's turns list (its batch job ids, oldest first)
--
-- Returns {queue key, job id}, or nil when every queue is empty.

local batch, owners, ring = KEYS[#KEYS - 2], KEYS[#KEYS - 1], KEYS[#KEYS]

for i = 1, #KEYS - 3 do
  local id = redis.call("LPOP", KEYS[i])
  if id then return {KEYS[i], id} end
end

local head = redis.call("LINDEX", batch, 0)
if not head then return nil end
-- A job with no owner was put back at the front (requeued after a crash, handed back on
-- shutdown, requeued by an operator): it has waited its turn already.
if redis.call("HEXISTS", owners, head) == 0 then
  redis.call("LPOP", batch)
  return {batch, head}
end

for _ = 1, redis.call("LLEN", ring) do
  local tag = redis.call("LPOP", ring)
  local turns = ARGV[1] .. tag
  local chosen = nil
  while not chosen do
    local id = redis.call("LPOP", turns)
    if not id then break end
    redis.call("HDEL", owners, id)
    -- 0 when the job left the queue meanwhile (canceled): skip it
    if redis.call("LREM", batch, 1, id) == 1 then chosen = id end
  end
  -- a client stays in the ring exactly while it has turns left (admission relies on that)
  if redis.call("LLEN", turns) > 0 then redis.call("RPUSH", ring, tag) end
  if chosen then return {batch, chosen} end
end

-- jobs with an owner but no turn (should not happen; never strand one)
local id = redis.call("LPOP", batch)
if id then
  redis.call("HDEL", owners, id)
  return {batch, id}
end
return nil
