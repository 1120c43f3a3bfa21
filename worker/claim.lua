-- A worker claims its next job: the first job of the highest-priority queue, except that the
-- batch tier (the last queue) is served in turns by client (round robin), so one client's wide
-- fan-out cannot starve another's that arrived later.
--
-- The job's id goes to the worker's claimed list in the same step, so a worker killed before RQ
-- records the job as started loses nothing: the watchdog puts what is left there back.
--
-- KEYS[1..#KEYS-5] the plain queues, highest priority first (first come, first served)
-- KEYS[#KEYS-4]    the batch queue (RQ's list: every batch-tier job, in arrival order)
-- KEYS[#KEYS-3]    owners (hash: job id -> client tag) of batch jobs that wait their client's turn
-- KEYS[#KEYS-2]    the ring of client tags with waiting batch jobs, next to serve first
-- KEYS[#KEYS-1]    this worker's claimed list
-- KEYS[#KEYS]      the set of workers that have claimed lists
-- ARGV[1]          prefix of a client's turns list (its batch job ids, oldest first)
-- ARGV[2]          this worker's name
--
-- Returns {queue key, job id}, or nil when every queue is empty.

local batch, owners, ring = KEYS[#KEYS - 4], KEYS[#KEYS - 3], KEYS[#KEYS - 2]

local function claimed(queue, id)
  redis.call("RPUSH", KEYS[#KEYS - 1], id)
  redis.call("SADD", KEYS[#KEYS], ARGV[2])
  return {queue, id}
end

for i = 1, #KEYS - 5 do
  local id = redis.call("LPOP", KEYS[i])
  if id then return claimed(KEYS[i], id) end
end

local head = redis.call("LINDEX", batch, 0)
if not head then return nil end
-- A job with no owner was put back at the front (requeued after a crash, handed back on
-- shutdown, requeued by an operator): it has waited its turn already.
if redis.call("HEXISTS", owners, head) == 0 then
  redis.call("LPOP", batch)
  return claimed(batch, head)
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
  if chosen then return claimed(batch, chosen) end
end

-- jobs with an owner but no turn (should not happen; never strand one)
local id = redis.call("LPOP", batch)
if id then
  redis.call("HDEL", owners, id)
  return claimed(batch, id)
end
return nil
