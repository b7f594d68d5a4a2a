-- push.lua: store jobs, ready now or after a delay, applying the id and unique-key rules.
--
-- Key schema (every key of a queue shares the hash tag {<prefix>:<queue>}, so a queue lives in
-- one Redis Cluster slot; <tag> below is `<prefix>:{<prefix>:<queue>}`):
--   <tag>:ready          list    job ids ready to run, the head first (at_front jobs pushed there)
--   <tag>:delayed        zset    job id -> time it becomes ready (ms)
--   <tag>:reserved       zset    job id -> time its lease expires (ms)
--   <tag>:payloads       hash    job id -> payload (JSON); present while waiting or running
--   <tag>:attempts       hash    job id -> tries started so far (the reservation token)
--   <tag>:wake           list    wake-up tokens for idle workers blocked in BLPOP
-- (the six above are the wave-1 keys, unchanged in meaning: a wave-1 worker can run these jobs)
--   <tag>:front          set     delayed at_front jobs (they go to the head when due)
--   <tag>:cancel         set     running jobs whose cancellation was asked for
--   <tag>:job:<id>       hash    the job's status record (fields below), kept after it ended
--                                for its keep time (PEXPIRE), never expiring while it lives
--   <tag>:unique:<key>   string  the id of the job holding unique key <key> (PX unique_for)
--   <tag>:waiter:<id>    string  set (PX) while someone waits for <id> to end
--   <tag>:waiters        string  set (PX) while someone waits for a job of the queue to end
--   <tag>:done:<id>      list    a token pushed when <id> ends and someone waits (PX 60 s)
--   <tag>:counts:<min>   hash    status -> jobs that ended so in that minute (EXPIRE 3 h)
-- Record fields (times in ms since the epoch, the server's clock): status, job, max_tries,
-- attempts, enqueued_at, due_at, started_at, ended_at, worker, error, traceback, result,
-- expires_at (due_at + ttl, until the first try starts), failure_ttl (ms), unique_key,
-- unique_for (ms).
-- Keys named <tag>:...:<id> are built here from ARGV[1] (the tag): they are in the same slot.
-- Issue #13 keys (priorities, dependencies, workflow records, limits, once keys): lib.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 wake, 5 attempts, 6 reserved, 7 front
-- ARGV: 1 tag, 2 the connection's result ttl ms (a workflow record that succeeds is kept so
--       long), 3 the queue's name, 4 option set count m, then m option sets of 23: delay ms (0: ready now), job
--       class path, max_tries ('' unknown), at_front (1/0), check_id (1/0), unique key (''
--       none), unique_for ms, on_duplicate (reject/keep/replace), ttl ms (0 none), failure_ttl
--       ms, priority, rule, kind (job/chain/batch), cancel_on_failure (1/0), limited (1/0),
--       limit key, limit interval ms (0: no rate), burst, concurrency (0: none), once key (''
--       none), once_for ms, max_length (0: no bound), overflow (reject/drop_oldest); then per
--       job: id, payload, the number of its option set (1..m), its group ('' none), its
--       dependency count d, then d pairs (dependency's queue tag, dependency id). Jobs of
--       one bulk push usually share their options: they are sent once.
-- Groups (lib.lua): a job of a group without a holder takes the turn and is stored as any
-- job; else it joins the line's tail (status `queued`, due_at its own due time, `front` kept
-- for when it takes the turn). A job with dependencies joins when they release it.
-- Bounds: with max_length, a job about to be stored (not a workflow record) is counted against
-- the queue's waiting jobs (as stats counts pending + delayed: ready list, prio set, delayed
-- set, <tag>:nheld, <tag>:glen); at the bound "reject" refuses it ("full", counted `rejected`),
-- "drop_oldest" stores it, then ends the head of this job's group line, else the oldest
-- plain ready job (status cancelled, counted `dropped`); with neither it refuses it.
-- A push that replaces a waiting job's payload counts `coalesced`.
-- Returns: pairs of (outcome, id): outcome created/duplicate/kept/replaced/missing/full, id
--          the job that holds the work (the new one, or the holder of the id or key), or for
--          `missing` the unknown dependency (nothing of the job stored)
local tag = ARGV[1]
local q = home(tag)
local result_keep = ARGV[2]
local qname = ARGV[3]
local out = {}
local NOPT = 23
local ENDED = {succeeded = true, failed = true, cancelled = true, expired = true}

-- A job is waiting if its payload is stored and no worker holds it.
local function waiting(id)
  return redis.call('HEXISTS', KEYS[3], id) == 1 and not redis.call('ZSCORE', KEYS[6], id)
end

local fields
local function add(name, value)
  fields[#fields + 1] = name
  fields[#fields + 1] = value
end

-- The queue's waiting jobs, as stats.lua counts pending + delayed.
local function waiting_count()
  local n = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', q.prio)
    + redis.call('ZCARD', KEYS[2]) + (tonumber(redis.call('GET', q.glen)) or 0)
  return n + held_total(q)
end

-- The waiting job a "drop_oldest" push of group `g` ('' none) drops: the head of g's line,
-- else the oldest plain ready job (the ready list's first that is not an at_front job at its
-- head, skipping entries left by late acks). Returns its id and whether it is a line job, or
-- nil. Chosen before the new job is stored, dropped after (`drop`).
local function oldest(g)
  if g ~= '' then
    local victim = redis.call('LINDEX', gline(q, g), 0)
    if victim then return victim, true end
  end
  local fronts = has(q, 'has_fronts', q.fronts)
  local from = 0
  while true do
    local slice = redis.call('LRANGE', KEYS[1], from, from + 99)
    for _, victim in ipairs(slice) do
      if redis.call('HEXISTS', KEYS[3], victim) == 1
          and not (fronts and redis.call('SISMEMBER', q.fronts, victim) == 1) then
        return victim, false
      end
    end
    if #slice < 100 then return nil end
    from = from + 100
  end
end

-- End the chosen job (near the head of its list: LREM stops there), counted `dropped`; a
-- turn holder passes its group's turn.
local function drop(victim, lined, g, err)
  if lined then
    if redis.call('LREM', gline(q, g), 1, victim) == 0 then return end
    redis.call('DECR', q.glen)
  elseif redis.call('LREM', KEYS[1], 1, victim) == 0 then
    return
  end
  end_waiting(q, victim, 'cancelled', err, 0, false, 'dropped')
end

local sets = tonumber(ARGV[4])
local j = 5 + sets * NOPT
while j <= #ARGV do
  local id, payload = ARGV[j], ARGV[j + 1]
  -- ARGV[i + 2] .. ARGV[i + 24] are this job's options, in the header's order.
  local i = 5 + (tonumber(ARGV[j + 2]) - 1) * NOPT - 2
  local group = ARGV[j + 3]
  local ndeps = tonumber(ARGV[j + 4])
  -- A dependency named twice counts once (the first naming keeps its place).
  local deps, named = {}, {}
  for d = 1, ndeps do
    local dtag, did = ARGV[j + 3 + 2 * d], ARGV[j + 4 + 2 * d]
    local r = ref(dtag, did)
    if not named[r] then
      named[r] = true
      deps[#deps + 1] = {dtag, did}
    end
  end
  j = j + 5 + 2 * ndeps
  ndeps = #deps
  local delay = tonumber(ARGV[i + 2])
  local ukey, dup = ARGV[i + 7], ARGV[i + 9]
  local outcome, holder = 'created', id
  local ufor = tonumber(ARGV[i + 8])
  local kind = ARGV[i + 14]
  local once, once_key = ARGV[i + 21], nil

  -- Dependencies: each known (its record, or a payload of a job pushed by older code).
  for _, d in ipairs(deps) do
    if far(d[1]) then
      -- On a cluster, in another slot: the driver found it before this push (redis_relay.py);
      -- the subscription (lib.lua: the relay) registers this job there, or resolves it at once
      -- if the dependency has ended meanwhile.
      d[3] = false
    else
      -- A dependency may be in another queue: its keys come from lib.lua's Q (cross-queue).
      local dq = Q(d[1])
      local st = redis.call('HGET', dq.tag .. ':job:' .. d[2], 'status')
      if not st and redis.call('HEXISTS', dq.payloads, d[2]) == 0 then
        outcome, holder = 'missing', d[2]
        break
      end
      d[3] = st or 'queued'
    end
  end

  if outcome ~= 'created' then
    -- missing: nothing stored
  elseif once ~= '' and redis.call('EXISTS', tag .. ':once:' .. once) == 1 then
    once_key = tag .. ':once:' .. once
    outcome, holder = 'duplicate', redis.call('GET', once_key)
  elseif ARGV[i + 6] == '1' and (redis.call('HEXISTS', KEYS[3], id) == 1
      or redis.call('SISMEMBER', q.flows, id) == 1) then
    -- The id is waiting or running (or a workflow record that has not ended).
    if dup == 'reject' then
      outcome = 'duplicate'
    elseif dup == 'replace' and redis.call('HEXISTS', KEYS[3], id) == 1
        and not redis.call('ZSCORE', KEYS[6], id) then
      redis.call('HSET', KEYS[3], id, payload)
      redis.call('HSET', tag .. ':job:' .. id, 'job', ARGV[i + 3], 'max_tries', ARGV[i + 4])
      outcome = 'replaced'
      count(q, 'coalesced')
    else
      outcome = 'kept'
    end
  elseif ukey ~= '' then
    local ukey_key = tag .. ':unique:' .. ukey
    local current = redis.call('GET', ukey_key)
    if current and current ~= id then
      if waiting(current) then
        holder = current
        if dup == 'reject' then
          outcome = 'duplicate'
        elseif dup == 'replace' then
          redis.call('HSET', KEYS[3], current, payload)
          redis.call('HSET', tag .. ':job:' .. current, 'job', ARGV[i + 3], 'max_tries', ARGV[i + 4])
          outcome = 'replaced'
          count(q, 'coalesced')
        else
          outcome = 'kept'
        end
      elseif redis.call('PTTL', ukey_key) > 0 then
        -- Held for unique_for after dispatch, its holder running or ended.
        holder = current
        outcome = dup == 'reject' and 'duplicate' or 'kept'
      end
      -- Otherwise the holder runs (unique_for 0) or is gone: this job is its successor.
    end
  end

  local flow = kind == 'chain' or kind == 'batch'
  local bound = tonumber(ARGV[i + 23]) or 0
  local victim, victim_lined
  if outcome == 'created' and bound > 0 and not flow and waiting_count() >= bound then
    if ARGV[i + 24] == 'drop_oldest' then victim, victim_lined = oldest(group) end
    if not victim then
      outcome = 'full'
      count(q, 'rejected')
    end
  end

  if outcome == 'created' then
    local rec = tag .. ':job:' .. id
    if flow then
      redis.call('HDEL', KEYS[3], id)
    elseif redis.call('HSET', KEYS[3], id, payload) == 0 then
      -- The id was already stored (a failed job retried before its worker's late ack landed):
      -- start it afresh, so that ack no longer matches and the tries really reset.
      redis.call('HDEL', KEYS[5], id)
      redis.call('ZREM', KEYS[6], id)
      unlimit(q, id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('LREM', KEYS[1], 0, id)
      redis.call('SREM', KEYS[7], id)
      redis.call('SREM', tag .. ':cancel', id)
      local old = redis.call('HMGET', rec, 'pm', 'group', 'status')
      if old[1] then redis.call('ZREM', q.prio, old[1]) end
      if old[2] and old[2] ~= '' and old[3] ~= 'deferred' then
        -- Out of its group's line, or its turn passed (it starts afresh below).
        if not in_line(q, id, old[2]) then
          pass_turn(q, old[2])
        elseif redis.call('LREM', gline(q, old[2]), 1, id) > 0 then
          redis.call('DECR', q.glen)
        end
      end
      redis.call('SREM', q.deferred, id)
      redis.call('DEL', tag .. ':on:' .. id, tag .. ':wait:' .. id)
    end
    -- A record of an earlier job with this id (ended, or reset above) is replaced.
    redis.call('DEL', rec, tag .. ':done:' .. id)
    local due = now + delay
    local deferred = ndeps > 0 or flow
    local prio = tonumber(ARGV[i + 12]) or 0
    local front = ARGV[i + 5] == '1'
    fields = {
      'status', deferred and 'deferred' or (delay > 0 and 'scheduled' or 'queued'),
      'job', ARGV[i + 3], 'max_tries', ARGV[i + 4], 'enqueued_at', now,
      'failure_ttl', ARGV[i + 11],
    }
    local ttl = tonumber(ARGV[i + 10])
    if deferred then
      add('release_at', due)
      if ttl > 0 then add('ttl', ttl) end
      if front then add('front', '1') end
      if ARGV[i + 13] ~= 'succeeded' then add('rule', ARGV[i + 13]) end
    else
      add('due_at', due)
      if ttl > 0 then add('expires_at', due + ttl) end
    end
    if prio ~= 0 then add('priority', prio) end
    local lined = false
    if group ~= '' then
      add('group', group)
      lined = not deferred and not join_group(q, id, group)
      if lined then
        fields[2] = 'queued'
        if front then add('front', '1') end
      end
    end
    if deferred and not flow then
      -- Its place in push order among the deferred jobs (browse.lua): a bulk push shares a ms.
      add('dseq', redis.call('INCR', q.seq))
    end
    if flow then
      add('kind', kind)
      add('p_total', ndeps)
      add('rkeep', result_keep)
      if ARGV[i + 15] == '1' then add('cof', '1') end
    end
    if ARGV[i + 16] == '1' then
      add('lkey', ARGV[i + 17])
      add('lint', ARGV[i + 18])
      add('lburst', ARGV[i + 19])
      add('lconc', ARGV[i + 20])
    end
    if ukey ~= '' then
      add('unique_key', ukey)
      add('unique_for', ufor)
      if ufor > 0 then
        redis.call('SET', tag .. ':unique:' .. ukey, id, 'PX', ufor)
      else
        redis.call('SET', tag .. ':unique:' .. ukey, id)
      end
    end
    redis.call('HSET', rec, unpack(fields))
    if deferred then
      if flow then
        redis.call('SADD', q.flows, id)
      else
        redis.call('SADD', q.deferred, id)
      end
      local me = ref(tag, id)
      local wait, on = tag .. ':wait:' .. id, tag .. ':on:' .. id
      for _, d in ipairs(deps) do
        local r = ref(d[1], d[2])
        redis.call('RPUSH', on, r)
        redis.call('SADD', wait, r)
      end
      -- Live dependencies take this job as a dependent; ended ones apply their end at once.
      for _, d in ipairs(deps) do
        if not d[3] then
          emit(d[1], 's', d[2], me)
        elseif not ENDED[d[3]] then
          local dq = Q(d[1])
          redis.call('RPUSH', dq.tag .. ':deps:' .. d[2], me)
          redis.call('SADD', dq.hasdeps, d[2])
          dq.has_deps = true
        end
      end
      for _, d in ipairs(deps) do
        if d[3] and ENDED[d[3]] then resolve(me, ref(d[1], d[2]), d[2], d[3]) end
      end
      if flow and ndeps == 0 then end_record(q, id) end
    elseif lined then
      -- In its group's line (lib.lua: pass_turn places it when its turn comes).
    elseif delay > 0 then
      delay_job(q, id, due, prio, front)
    else
      place(q, id, false, front, prio)
    end
    if victim then
      -- After the store: a dependent of the dropped job pushed just now is resolved too.
      drop(victim, victim_lined, group, 'dropped: queue ' .. qname .. ' is full (' .. bound
        .. ' waiting)')
    end
  end
  if once ~= '' and not once_key and outcome ~= 'missing' and outcome ~= 'full' then
    -- Stored, or answered by a holder (duplicate, kept, replaced): the key is taken for the job
    -- that answered, so a second push with it stores nothing, whatever the first one did.
    redis.call('SET', tag .. ':once:' .. once, holder, 'PX', math.max(1, tonumber(ARGV[i + 22])))
  end
  out[#out + 1] = outcome
  out[#out + 1] = holder
end
flush(nil)
return reply(out)
