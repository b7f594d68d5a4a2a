-- reserve.lua: acknowledge finished jobs, then reserve up to `limit` ready jobs under a lease.
--
-- Before reserving it makes due delayed jobs ready (in due order; at_front ones to the head)
-- and returns jobs whose lease expired to the head of the queue: every worker that reserves
-- also reaps, atomically, so a due or orphaned job is handed to exactly one worker. A reaped
-- job whose cancellation was asked for is cancelled instead; a job whose first try did not
-- start within its ttl is expired instead of handed out. Key schema and record fields: see
-- push.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 payloads, 5 attempts, 6 wake, 7 front, 8 cancel
-- ARGV: 1 limit, 2 lease ms, 3 worker id, 4 tag, 5 failure_ttl ms for records without one
--       (jobs pushed by wave-1 code), 6 ack count n, 7 outcome count m, then m outcomes of 5
--       (-m: of 6, with info) and n acks of 3 as in ack.lua, then the reserver id (one per driver instance), this
--       call's grant token, and the tokens of this reserver's calls whose reply never came
-- Grants: <tag>:grant:<reserver> = "token id attempts id attempts ..." holds the jobs handed
--       out by the reserver's last call that reserved any. A reply lost on the way (the script
--       ran, the connection broke before the answer arrived: a server crash right after its
--       append-only fsync) is indistinguishable from a dead worker to everyone but the worker
--       that sent it: when it calls again naming the lost token, the jobs still held under that
--       grant (same attempts, not handed to anyone else) are handed back to it with their try
--       unchanged, instead of lapsing and coming back a try later (lost on a last try).
--       They come first in the reply and count against `limit` (all are returned, even past
--       it: they are the caller's already).
-- Priorities, limits and dependencies (lib.lua): jobs in the prio set with a score below 0
-- (at_front, then higher priorities) come before the ready list, those above 0 after it; a job
-- whose limit does not allow a start now is held back (not handed out, no try counted) and the
-- next one is looked at; every end resolves the ended job's dependents in this same script.
-- Groups (lib.lua): every end here (an ack, a ttl expiry, a cancel of a reaped job) passes
-- its group's turn; a lost lease keeps it (the job goes back ready, still in turn).
-- Returns: {next_ms, id1, payload1, attempts1, id2, ...} where next_ms is, when nothing was
--          reserved, how long until a delayed job, a lease or a held-back limit key falls due
--          (-1: none); else 0. A job this call expired (past its ttl) comes with attempts
--          -1 - its tries so far: it holds no lease, it is only reported (in addition to
--          `limit`).
local limit, lease, worker, tag = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local default_keep, acks = ARGV[5], tonumber(ARGV[6])
local outcomes, width = outcome_count(ARGV[7])
local q = home(tag)
probe(q)

local first = 8 + outcomes * width
for j = first, first + acks * 3 - 1, 3 do
  -- ARGV[i + 2] .. ARGV[i + 6] (+ 7: info) are this job's outcome, in ack.lua's order.
  local i = 8 + (tonumber(ARGV[j + 2]) - 1) * width - 2
  ack_one(q, ARGV[j], ARGV[j + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4], ARGV[i + 5],
    ARGV[i + 6], width == 6 and ARGV[i + 7] or '')
end

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, 1000)
if #due > 0 then
  if redis.call('EXISTS', KEYS[7]) == 1 then
    -- Some go to the prio set (at_front, prioritized): in due order there.
    for i = 1, #due, 2 do
      redis.call('ZREM', KEYS[2], due[i])
      place_due(q, due[i], redis.call('SREM', KEYS[7], due[i]) == 1, tonumber(due[i + 1]))
    end
  else
    local ids = {}
    for i = 1, #due, 2 do ids[#ids + 1] = due[i] end
    redis.call('ZREM', KEYS[2], unpack(ids))
    redis.call('RPUSH', KEYS[1], unpack(ids))
  end
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #expired > 0 then
  redis.call('ZREM', KEYS[3], unpack(expired))
  local cancels = redis.call('EXISTS', KEYS[8]) == 1
  -- Pushed to the head newest first, so that the oldest ends at the head.
  for i = #expired, 1, -1 do
    local id = expired[i]
    unlimit(q, id)
    if cancels and redis.call('SISMEMBER', KEYS[8], id) == 1 then
      end_waiting(q, id, 'cancelled', 'cancelled while its worker was lost', default_keep, false)
    else
      local rec = tag .. ':job:' .. id
      if redis.call('EXISTS', rec) == 1 then
        redis.call('HSET', rec, 'status', 'retrying', 'due_at', now)
        place(q, id, true, false, nil)
      else
        redis.call('LPUSH', KEYS[1], id)
      end
    end
  end
end
-- Dependents released by those ends are ready for this very call.
if #work_ > 0 then settle() end
-- Limit keys whose held-back jobs may start again.
if has(q, 'has_limited', q.limited) then
  local keys = redis.call('ZRANGEBYSCORE', q.limited, '-inf', now, 'LIMIT', 0, 100)
  for _, key in ipairs(keys) do
    redis.call('ZREM', q.limited, key)
    kick(q, key)
  end
end

local tail = first + acks * 3
local grant_key, token = tag .. ':grant:' .. ARGV[tail], ARGV[tail + 1]
local grant = {token}
local out = {0}
local got = 0
if #ARGV > tail + 1 then
  local last = redis.call('GET', grant_key)
  local parts = {}
  if last then
    for part in string.gmatch(last, '%S+') do parts[#parts + 1] = part end
  end
  local lost = false
  for j = tail + 2, #ARGV do
    if ARGV[j] == parts[1] then lost = true end
  end
  if lost then
    for g = 2, #parts - 1, 2 do
      local id, tries = parts[g], parts[g + 1]
      local payload = redis.call('HGET', KEYS[4], id)
      local rec = tag .. ':job:' .. id
      local pm = payload and redis.call('HGET', rec, 'pm')
      -- Still ours: its try was not counted again (reaped jobs wait in the queue untouched).
      if payload and redis.call('HGET', KEYS[5], id) == tries
          and (redis.call('ZSCORE', KEYS[3], id)
            or (pm and redis.call('ZREM', q.prio, pm) == 1)
            or (not pm and redis.call('LREM', KEYS[1], 1, id) == 1)) then
        if pm then redis.call('HDEL', rec, 'pm') end
        local l = redis.call('HMGET', rec, 'lkey', 'lconc')
        if l[1] and (tonumber(l[2]) or 0) > 0 then
          -- Reaped meanwhile, its slot freed: it holds one again (start counted once).
          redis.call('SADD', tag .. ':running:' .. l[1], id)
          redis.call('HSET', q.runkey, id, l[1])
          q.has_runkey = true
        end
        redis.call('ZADD', KEYS[3], now + lease, id)
        if redis.call('EXISTS', rec) == 1 then
          redis.call('HSET', rec, 'status', 'running', 'worker', worker)
        end
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = tonumber(tries)
        grant[#grant + 1] = id
        grant[#grant + 1] = tries
        got = got + 1
      end
    end
  end
end

-- Start one popped job (or expire it, or hold it back by its limit).
local function start(id)
  local payload = redis.call('HGET', KEYS[4], id)
  -- No payload: the job was acknowledged after its lease had expired; it is done.
  if not payload then return end
  local rec = tag .. ':job:' .. id
  local f = redis.call('HMGET', rec, 'expires_at', 'unique_key', 'unique_for', 'lkey', 'lint',
    'lburst', 'lconc', 'held', 'lf')
  if f[9] then
    -- An at_front job that was at the head of the list (lib.lua: place).
    redis.call('SREM', q.fronts, id)
    redis.call('HDEL', rec, 'lf')
  end
  -- Record fields are not trusted (see keep_of): an expires_at that is no number is no ttl.
  local expires = tonumber(f[1])
  if expires and expires <= now and not redis.call('HGET', KEYS[5], id) then
    local due = tonumber(redis.call('HGET', rec, 'due_at')) or expires
    end_waiting(q, id, 'expired', 'not started within its ttl of ' .. (expires - due) / 1000 .. 's',
      default_keep, false)
    out[#out + 1] = id
    out[#out + 1] = payload
    out[#out + 1] = -1
    return
  end
  if f[4] and not admit(q, id, {f[4], f[5], f[6], f[7], f[8]}) then return end
  if f[1] then redis.call('HDEL', rec, 'expires_at') end
  if f[2] and f[2] ~= '' and (f[3] or '0') == '0'
      and redis.call('GET', tag .. ':unique:' .. f[2]) == id then
    -- unique_for 0: the key is free for a successor once the job starts.
    redis.call('DEL', tag .. ':unique:' .. f[2])
  end
  local attempts = redis.call('HINCRBY', KEYS[5], id, 1)
  redis.call('ZADD', KEYS[3], now + lease, id)
  redis.call('HSET', rec, 'status', 'running', 'attempts', attempts, 'started_at', now,
    'worker', worker)
  out[#out + 1] = id
  out[#out + 1] = payload
  out[#out + 1] = attempts
  grant[#grant + 1] = id
  grant[#grant + 1] = attempts
  got = got + 1
end

-- The head of the list if it is an at_front job.
local function pop_front()
  local id = redis.call('LINDEX', KEYS[1], 0)
  if id and redis.call('SISMEMBER', q.fronts, id) == 1 then
    redis.call('LPOP', KEYS[1])
    return id
  end
  return nil
end

-- The next job when the prio set exists: at_front (the prio set's, pushed later, then the
-- list's), higher priorities, the list, lower priorities. The set's first member is popped
-- once and put back as it was when something else goes first.
local function pop_next()
  local m = redis.call('ZPOPMIN', q.prio)
  local score = m[1] and tonumber(m[2])
  local id
  if not (score and score < -MAXP) then
    id = has(q, 'has_fronts', q.fronts) and pop_front()
    if not id and not (score and score < 0) then id = redis.call('LPOP', KEYS[1]) end
  end
  if id then
    if m[1] then redis.call('ZADD', q.prio, m[2], m[1]) end
    return id
  end
  if not m[1] then return nil end
  id = string.sub(m[1], 31)
  redis.call('HDEL', tag .. ':job:' .. id, 'pm')
  return id
end

local prio = has(q, 'has_prio', q.prio)
while limit > got do
  if prio then
    local id = pop_next()
    if not id then break end
    start(id)
  else
    local ids = redis.call('LPOP', KEYS[1], limit - got)
    if not ids then break end
    for _, id in ipairs(ids) do start(id) end
  end
  if #work_ > 0 then settle() end
  -- A start or an end may have made prioritized jobs ready (a held job let go, a dependent).
  if q.has_prio then prio = true end
end

if got > 0 then
  -- Kept a minute past the lease: long enough for a worker to reconnect after a restart.
  redis.call('SET', grant_key, table.concat(grant, ' '), 'PX', lease + 60000)
end

flush(tag)

local left = redis.call('LLEN', KEYS[1])
if prio or q.has_prio then left = left + redis.call('ZCARD', q.prio) end
if left == 0 then
  redis.call('DEL', KEYS[6])
elseif redis.call('LLEN', KEYS[6]) == 0 then
  -- Work remains: wake the next idle worker.
  redis.call('RPUSH', KEYS[6], '1')
end

if #out == 1 and left == 0 then
  local next_ms = -1
  local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if d[2] then next_ms = tonumber(d[2]) - now end
  local r = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if r[2] and (next_ms < 0 or tonumber(r[2]) - now < next_ms) then next_ms = tonumber(r[2]) - now end
  local l = redis.call('ZRANGE', q.limited, 0, 0, 'WITHSCORES')
  if l[2] and (next_ms < 0 or tonumber(l[2]) - now < next_ms) then next_ms = tonumber(l[2]) - now end
  if next_ms <= 0 and next_ms ~= -1 then next_ms = 1 end
  out[1] = next_ms
end
return reply(out)
