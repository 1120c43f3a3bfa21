#!lua
-- (`#!lua`, no flags: Redis 7 refuses the whole script up front when it cannot take writes, OOM,
-- MISCONF or a read-only replica, rather than letting it stop halfway or write past maxmemory.)
-- A worker claims its next job: by priority (the first queue with a job it may take), preferring
-- jobs for the model it runs, with the batch tier (the last queue) served in turns by client
-- (round robin), so one client's wide fan-out cannot starve another's that arrived later.
--
-- Model affinity, within one queue, in queue order: a job for the worker's model (or for no model)
-- is taken; a job for another model is taken once it has waited `swap_after` seconds and the
-- worker's last swap is as old (the worker then drains its batch and swaps: swaps are bounded).
-- Priority stays strict: while a job for another model waits in a queue, nothing is taken from
-- the queues below it.
-- An idle worker takes a job for another model at once, unless another live worker runs that
-- model (it is left to that worker until it is overdue). Jobs stay in RQ's lists until claimed,
-- so rq-dashboard shows where each one waits.
--
-- The job's id goes to the worker's claimed list in the same step, so a worker killed before RQ
-- records the job as started loses nothing: the watchdog puts what is left there back.
--
-- KEYS[1..#KEYS-6] the plain queues, highest priority first (first come, first served)
-- KEYS[#KEYS-5]    the batch queue (RQ's list: every batch-tier job, in arrival order)
-- KEYS[#KEYS-4]    owners (hash: job id -> client tag) of batch jobs that wait their client's turn
-- KEYS[#KEYS-3]    the ring of client tags with waiting batch jobs, next to serve first
-- KEYS[#KEYS-2]    this worker's claimed list
-- KEYS[#KEYS-1]    the set of workers that have claimed lists
-- KEYS[#KEYS]      hash: worker name -> the model of the last job it claimed
-- ARGV[1]  prefix of a client's turns list (its batch job ids, oldest first)
-- ARGV[2]  this worker's name
-- ARGV[3]  the model this worker runs ("" for none yet)
-- ARGV[4]  "1" when it holds jobs (busy), "0" when idle
-- ARGV[5]  "1" when its last swap is at least swap_after seconds old
-- ARGV[6]  swap_after, seconds
-- ARGV[7]  now, seconds since the epoch
-- ARGV[8]  prefix of RQ's job hashes
-- ARGV[9], ARGV[10]  prefix and suffix of a worker's heartbeat key
-- ARGV[11] how many jobs of a queue to look at
-- ARGV[12] the set of models still downloading (shared/pulls.py): their jobs wait where they are,
--          passed over without holding back anything below them
-- ARGV[13], ARGV[14]  prefix and suffix of a worker's set of held prefix blocks (shared/prefix_blocks.py)
-- ARGV[15] prefix_wait, seconds: how long a job waits for the worker that holds its prompt's start
-- ARGV[16] the wake-up list idle workers block on: a job held back for its holder wakes it
-- ARGV[17] how many jobs to claim at most (the room in the worker's batch)
--
-- Prefix affinity: a job carries the routing names of its prompt's blocks, deepest first (meta.prefix).
-- While it has waited less than prefix_wait, a worker passes it over when another live worker holds a
-- deeper block of it than this one does: that worker starts it without prefilling what it holds.
--
-- Returns {queue key, job id, ...}: up to ARGV[17] jobs, each claimed as if by a call of its own made by
-- the worker once busy with the ones before it (so all for one model, and no second swap); "wait" when
-- none and jobs wait that this worker may take later (another model's, not yet overdue); nil when there
-- is nothing. Jobs that arrive together start together: their prompts are prefilled in one piece.

local n = #KEYS
local batch, owners, ring = KEYS[n - 5], KEYS[n - 4], KEYS[n - 3]
local claimed_list, claiming, worker_models = KEYS[n - 2], KEYS[n - 1], KEYS[n]
local me, mine = ARGV[2], ARGV[3]
local busy, may_swap = ARGV[4] == "1", ARGV[5] == "1"
local swap_after, now, job_prefix, scan = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[11])

-- RQ's timestamps: "2026-12-01T02:45:08.123456Z" (UTC) -> seconds since the epoch
local function epoch(stamp)
  local y, mo, d, h, mi, s = string.match(stamp, "^(%d+)-(%d+)-(%d+)T(%d+):(%d+):([%d%.]+)")
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo <= 2 then y, mo = y - 1, mo + 12 end
  local days = 365 * y + math.floor(y / 4) - math.floor(y / 100) + math.floor(y / 400)
    + math.floor((153 * (mo - 3) + 2) / 5) + d - 719469
  return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(s)
end

-- the job's model (nil when it names none), how long it has waited (huge when unknown), the routing
-- names of its prompt's blocks (nil when it has none), whether it is a crash suspect (it was running
-- when a worker died: it runs alone, worker/supervision/crash_suspect.py) and whether it runs beside any
-- generation (an embedding or rerank job, meta.kind: taking it is no swap)
local suspects = {}  -- the ids `about` found to be crash suspects
local function about(id)
  local fields = redis.call("HMGET", job_prefix .. id, "meta", "enqueued_at")
  local model, prefix, suspect, beside = nil, nil, false, false
  if fields[1] then
    local ok, meta = pcall(cjson.decode, fields[1])
    if ok and type(meta) == "table" then
      if type(meta.model) == "string" then model = meta.model end
      beside = type(meta.kind) == "string"
      if type(meta.prefix) == "table" and #meta.prefix > 0 then prefix = meta.prefix end
      suspect = (tonumber(meta.crash_attempts) or 0) > 0
      suspects[id] = suspect or nil
    end
  end
  local at = fields[2] and epoch(fields[2])
  return model, at and (now - at) or math.huge, prefix, suspect, beside
end

-- the place in `prefix` of the deepest block the worker holds (1 is the deepest); nil when none
local function depth(worker, prefix)
  local held = ARGV[13] .. worker .. ARGV[14]
  for i, name in ipairs(prefix) do
    if redis.call("SISMEMBER", held, name) == 1 then return i end
  end
  return nil
end

local others = nil
-- whether another live worker holds a deeper block of `prefix` than this one
local function held_deeper_elsewhere(prefix)
  if others == nil then
    others = {}
    for _, worker in ipairs(redis.call("SMEMBERS", claiming)) do
      if worker ~= me and redis.call("EXISTS", ARGV[9] .. worker .. ARGV[10]) == 1 then
        others[#others + 1] = worker
      end
    end
  end
  if #others == 0 then return false end
  local mine = depth(me, prefix) or math.huge
  for _, worker in ipairs(others) do
    local theirs = depth(worker, prefix)
    if theirs and theirs < mine then return true end
  end
  return false
end

local elsewhere = nil
local function runs_elsewhere(model)
  if elsewhere == nil then
    elsewhere = {}
    local all = redis.call("HGETALL", worker_models)
    for i = 1, #all, 2 do
      if all[i] ~= me and redis.call("EXISTS", ARGV[9] .. all[i] .. ARGV[10]) == 1 then
        elsewhere[all[i + 1]] = true
      end
    end
  end
  return elsewhere[model] == true
end

-- "now": take it before anything after it; "idle": take it if nothing in its queue is "now"; "stop":
-- a crash suspect met after the call's first claim, which the call leaves, and everything after it, alone
local passed_over, held_back, with_others = false, false, false
local prefix_wait = tonumber(ARGV[15])
local function verdict(id)
  local model, waited, prefix, suspect, beside = about(id)
  if suspect and with_others then return "stop", model end
  if model ~= nil and redis.call("SISMEMBER", ARGV[12], model) == 1 then return nil, model end
  if beside then return "now", nil end  -- claimed as a job for no model: the worker's stays as it is
  if prefix and waited < prefix_wait and held_deeper_elsewhere(prefix) then
    held_back = true  -- not `passed_over`: nothing below it waits on this
    return nil, model
  end
  if model == nil or mine == "" or model == mine then return "now", model end
  if waited >= swap_after and may_swap then return "now", model end
  if busy or runs_elsewhere(model) then
    passed_over = true
    return nil, model
  end
  return "idle", model
end

local function claimed(queue, id, model)
  redis.call("RPUSH", claimed_list, id)
  redis.call("SADD", claiming, me)
  if model then redis.call("HSET", worker_models, me, model) end
  return {queue, id, model}
end

-- The batch tier. A job with no owner at the head was put back at the front (requeued after a
-- crash, handed back on shutdown, requeued by an operator): it has waited its turn already.
local function take(id, model)
  redis.call("LREM", batch, 1, id)
  return claimed(batch, id, model)
end

local function nothing()
  -- The wake-up admission sent may have reached this worker rather than the holder: pass one on.
  if held_back and redis.call("LLEN", ARGV[16]) < 8 then redis.call("RPUSH", ARGV[16], "held") end
  return (passed_over or held_back) and "wait" or nil
end

-- the client's next turn whose job is still queued (turns of canceled jobs are dropped)
local function next_turn(turns)
  while true do
    local id = redis.call("LINDEX", turns, 0)
    if not id then return nil end
    if redis.call("HEXISTS", owners, id) == 1 and redis.call("LPOS", batch, id) then return id end
    redis.call("LPOP", turns)
    redis.call("HDEL", owners, id)
  end
end

-- a client stays in the ring exactly while it has turns left (admission relies on that); the one
-- served goes to the back, the ones passed over keep their places
local function take_turn(tag, id, model)
  local turns = ARGV[1] .. tag
  redis.call("LPOP", turns)
  redis.call("HDEL", owners, id)
  redis.call("LREM", ring, 1, tag)
  if redis.call("LLEN", turns) > 0 then redis.call("RPUSH", ring, tag) end
  return take(id, model)
end

local function from_plain_queues()
  for i = 1, n - 6 do
    local fallback, fallback_model = nil, nil
    for _, id in ipairs(redis.call("LRANGE", KEYS[i], 0, scan - 1)) do
      local v, model = verdict(id)
      if v == "stop" then return v end
      if v == "now" then
        redis.call("LREM", KEYS[i], 1, id)
        return claimed(KEYS[i], id, model)
      elseif v == "idle" and not fallback then
        fallback, fallback_model = id, model
      end
    end
    if fallback then
      redis.call("LREM", KEYS[i], 1, fallback)
      return claimed(KEYS[i], fallback, fallback_model)
    end
    -- a job passed over here outranks everything below: lower-priority work for this worker's model
    -- would only prolong the drain it waits for
    if passed_over then return "wait" end
  end
  return nil
end

local function from_batch_tier()
  local fallback = nil
  local head = redis.call("LINDEX", batch, 0)
  if not head then return nothing() end
  if redis.call("HEXISTS", owners, head) == 0 then
    local v, model = verdict(head)
    if v == "stop" then return v end
    if v == "now" then return take(head, model) end
    if v == "idle" then fallback = {nil, head, model} end
  end
  for _, tag in ipairs(redis.call("LRANGE", ring, 0, -1)) do
    local id = next_turn(ARGV[1] .. tag)
    if not id then
      redis.call("LREM", ring, 1, tag)
    else
      local v, model = verdict(id)
      if v == "stop" then return v end
      if v == "now" then return take_turn(tag, id, model) end
      if v == "idle" and not fallback then fallback = {tag, id, model} end
    end
  end
  if fallback then
    if fallback[1] then return take_turn(fallback[1], fallback[2], fallback[3]) end
    return take(fallback[2], fallback[3])
  end
  -- jobs with an owner but no turn (should not happen; never strand one)
  for _, id in ipairs(redis.call("LRANGE", batch, 0, scan - 1)) do
    local owner = redis.call("HGET", owners, id)
    if owner and not redis.call("LPOS", ARGV[1] .. owner, id) then
      local v, model = verdict(id)
      if v == "stop" then return v end
      if v then
        redis.call("HDEL", owners, id)
        return take(id, model)
      end
    end
  end
  return nothing()
end

local function claim_one()
  passed_over, held_back = false, false
  local found = from_plain_queues()
  if found ~= nil then return found end
  return from_batch_tier()
end

-- Each job claimed is answered with its queue, its id and its hash (RQ's record of it, read here: the
-- worker's fetch of it was a round trip more before every job's start).
local want, got = tonumber(ARGV[17]) or 1, {}
while #got < 3 * want do
  local one = claim_one()
  if type(one) ~= "table" then
    if #got == 0 then return one end
    break
  end
  got[#got + 1], got[#got + 2] = one[1], one[2]
  got[#got + 1] = redis.call("HGETALL", ARGV[8] .. one[2])
  busy, may_swap, with_others = true, false, true
  if one[3] then mine = one[3] end
  if suspects[one[2]] then break end  -- a crash suspect runs alone
end
-- Admission pushed a wake-up with each job: those of the jobs claimed here would only wake a worker to
-- find nothing, a round trip each on its loop beside the starts of these. As many are left as jobs are
-- still queued, at most (and never more than there were: a job no worker takes yet does not wake one
-- again and again).
if #got > 0 then
  local queued = 0
  for i = 1, n - 5 do queued = queued + redis.call("LLEN", KEYS[i]) end
  if redis.call("LLEN", ARGV[16]) > queued then
    if queued == 0 then redis.call("DEL", ARGV[16]) else redis.call("LTRIM", ARGV[16], -queued, -1) end
  end
end
return got
