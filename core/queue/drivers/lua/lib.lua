-- lib.lua: state and functions shared by the scripts that end, place or release jobs.
-- redis.py prepends this file to push, reserve, ack, release, cancel, clear and retry_failed
-- (one script each, still run by EVALSHA). It defines `now` (ms, the server's clock) and
-- nothing runs here but reads of TIME. The functions build a queue's key names from its tag
-- (`Q`): for the script's own queue they are the names its KEYS carry (which name the slot).
-- A script ends with `flush` (dependents resolved, ended counts, wake tokens).
--
-- Keys added by issue #13 (key schema of the rest: push.lua), under the queue's tag:
--   <tag>:prio           zset    ready jobs that are prioritized or at_front: score -priority
--                                (at_front: below -MAX_PRIORITY, the latest first), member
--                                <band><13 digits: ms it became ready><16 digits: seq><id>
--                                (band 1: in order of readiness, a due job by its due time;
--                                band 0: refunds and lost leases, at the head of their level,
--                                latest first); the member is kept in the record (`pm`)
--   <tag>:seq            string  the sequence numbering those members
--   <tag>:fronts         set     at_front jobs pushed to the head of the ready list (when the
--                                prio set was empty: workers of older code run them); reserve
--                                takes them before prioritized jobs
--   <tag>:deferred       set     jobs waiting for dependencies (workflow records not in it)
--   <tag>:flows          set     workflow records (chain/batch) that have not ended
--   <tag>:deps:<id>      list    refs of the jobs waiting for <id> (its dependents)
--   <tag>:hasdeps        set     ids that have a deps list (one check per script on the plain
--                                path instead of one per job)
--   <tag>:on:<id>        list    refs of <id>'s dependencies, in push order (members of a record)
--   <tag>:wait:<id>      set     refs of <id>'s dependencies that have not ended
--   <tag>:limit:<key>    hash    limit state of (queue, key): tat (GCRA, ms), int (ms between
--                                starts), burst, conc (PEXPIRE: a day past tat)
--   <tag>:running:<key>  set     running jobs of a concurrency-limited key
--   <tag>:runkey         hash    running job id -> its limit key (jobs with a concurrency limit)
--   <tag>:held:<key>     list    ready jobs of <key> held back by their limit, in order
--   <tag>:heldkeys       set     keys with a held list (stats, clear)
--   <tag>:limited        zset    key -> when the first held job of <key> may start (rate)
--   <tag>:once:<key>     string  the id a push with once key <key> answered: the job it
--                                stored, or the holder that took it (PX once_for)
--   <tag>:gturn          hash    group -> the id of the job in turn (issue #14: `group`)
--   <tag>:gline:<group>  list    the group's line: ids waiting for the turn, in push order
--   <tag>:glen           string  how many jobs wait in all the queue's lines (stats, max_length)
--   <tag>:nheld          string  how many jobs wait in all the held lists (max_length): made
--                                from the lists when missing (held by older code, or cleared)
-- A ref names a job of any queue: <tag> .. "\0" .. <id>.
-- Record fields added: priority (when not 0), pm (its member while in <tag>:prio), front (1: a
-- delayed at_front job), kind (chain/batch), rule, cof (cancel_on_failure), release_at and ttl
-- (of a deferred job: its due time once released, its ttl then), lkey/lint/lburst/lconc (its
-- limit), held (1 once held back), lf (1: in <tag>:fronts), p_total/p_succeeded/p_failed/p_cancelled and rkeep (a
-- workflow record's counts and its keep when it succeeds), cofdone, group (the job's group, kept
-- after it ended), dseq (a deferred job's place in push order, from <tag>:seq: browse.lua).
-- Issue #16: info (an ended job's JSON object of description/meta, from its ack's outcome).
local T_ = redis.call('TIME')
local now = T_[1] * 1000 + math.floor(T_[2] / 1000)
local MAXP = 2147483647
local SEQ_TOP = 9999999999999999

-- ---------------------------------------------------------------------------------------
-- CROSS-QUEUE KEYS: the only place a script builds the keys of another queue than its own
-- (a dependent or dependency in another queue, reached through a ref). Those keys lie in
-- another hash tag: fine on a standalone server, NOT on Redis Cluster (issue #17).
-- ---------------------------------------------------------------------------------------
local queues_ = {}
local function Q(tag)
  local q = queues_[tag]
  if not q then
    q = {
      tag = tag, ready = tag .. ':ready', delayed = tag .. ':delayed',
      reserved = tag .. ':reserved', payloads = tag .. ':payloads',
      attempts = tag .. ':attempts', wake = tag .. ':wake', front = tag .. ':front',
      cancel = tag .. ':cancel', prio = tag .. ':prio', seq = tag .. ':seq',
      deferred = tag .. ':deferred', flows = tag .. ':flows', runkey = tag .. ':runkey',
      heldkeys = tag .. ':heldkeys', limited = tag .. ':limited', fronts = tag .. ':fronts',
      hasdeps = tag .. ':hasdeps', gturn = tag .. ':gturn', glen = tag .. ':glen',
      nheld = tag .. ':nheld',
    }
    queues_[tag] = q
  end
  return q
end

-- Whether the queue has the keys of prioritized, at_front, limited or dependency-bearing jobs:
-- one EXISTS on the plain path (all absent), each then known absent; otherwise each is asked
-- once when needed (the flags below, nil: not asked yet). Scripts that create one set its flag.
local function probe(q)
  if redis.call('EXISTS', q.prio, q.fronts, q.limited, q.runkey, q.hasdeps, q.gturn) == 0 then
    q.has_prio, q.has_fronts, q.has_limited, q.has_runkey, q.has_deps, q.has_groups =
      false, false, false, false, false, false
  end
end

local function has(q, flag, key)
  if q[flag] == nil then q[flag] = redis.call('EXISTS', key) == 1 end
  return q[flag]
end

-- ---------------------------------------------------------------------------------------
-- THE RELAY (issue #17). With CLUSTER false everything above and below runs inline, in one
-- atomic script, whatever queues it reaches. With CLUSTER true a script touches only its own
-- queue (`home`, the tag its KEYS name): where it would reach another queue's keys it appends
-- a message to its own outbox instead, and redis_relay.py runs lua/relay.lua on the other
-- queue's slot with it. Keys, under the home tag:
--   <tag>:outbox         list    messages not yet known to be delivered, oldest first
--   <tag>:outseq         string  the sequence numbering them (each message is unique)
-- A message is the JSON array [seq, ms appended, target tag, kind, ...]:
--   'r', dependent ref, dependency ref, dependency id, status   resolve a dependent
--   's', dependency id, dependent ref                           subscribe to a dependency
--   'x', member id, running (1/0), error                        cancel a workflow member
-- Delivery is at least once (a deliverer may die between relay.lua and the removal): every
-- handler is idempotent (relay.lua). The scripts' replies carry the messages they appended
-- (`reply`), so that the caller delivers them without reading the outbox; a message older
-- than STALE ms is reported by any script of the queue (reserve: every worker), and then
-- delivered by whoever saw it (a deliverer that died).
-- ---------------------------------------------------------------------------------------
local STALE = 2000
local home_ = nil
local outbox_ = {}

-- The script's own queue (every script names it first).
local function home(tag)
  home_ = tag
  return Q(tag)
end

-- Whether `tag` is another queue's, out of this script's reach (on a cluster only).
local function far(tag) return CLUSTER and tag ~= home_ end

local function emit(target, ...)
  local seq = redis.call('INCR', home_ .. ':outseq')
  local m = cjson.encode({seq, string.format('%d', now), target, ...})
  redis.call('RPUSH', home_ .. ':outbox', m)
  outbox_[#outbox_ + 1] = m
end

-- A script's reply: as is on a single server; on a cluster {reply, the messages this script
-- appended, 1 if the outbox holds a message older than STALE (a deliverer died) else 0}.
local function reply(r)
  if not CLUSTER then return r end
  local stale = 0
  if #outbox_ == 0 then
    local first = redis.call('LINDEX', home_ .. ':outbox', 0)
    if first then
      local at = tonumber(string.match(first, '^%[[^,]*,"(%d+)"'))
      if not at or now - at > STALE then stale = 1 end
    end
  end
  return {r, outbox_, stale}
end

local function ref(tag, id) return tag .. '\0' .. id end
local function unref(r)
  local at = string.find(r, '\0', 1, true)
  return string.sub(r, 1, at - 1), string.sub(r, at + 1)
end

-- Per-queue tallies written once at the end (flush).
local counted_ = {}
local woken_ = {}
local waiters_ = {}
local work_ = {}  -- ended jobs whose dependents are still to resolve: {tag, id, status}

local function count(q, status)
  local c = counted_[q.tag]
  if not c then c = {}; counted_[q.tag] = c end
  c[status] = (c[status] or 0) + 1
end

local function wake_queue(q) woken_[q.tag] = true end

local function wake_waiters(q, id)
  local w = waiters_[q.tag]
  if w == nil then
    w = redis.call('EXISTS', q.tag .. ':waiters') == 1
    waiters_[q.tag] = w
  end
  if w and redis.call('EXISTS', q.tag .. ':waiter:' .. id) == 1 then
    redis.call('RPUSH', q.tag .. ':done:' .. id, '1')
    redis.call('PEXPIRE', q.tag .. ':done:' .. id, 60000)
  end
end

-- A keep time from a record (not trusted: written by hand?): not a number counts as the
-- default, NaN as 0, past 3650 days as that, so that PEXPIRE never refuses it.
local function keep_of(raw, default)
  local keep = tonumber(raw) or tonumber(default) or 0
  if keep ~= keep then keep = 0 end
  return math.floor(math.min(math.max(keep, 0), 315360000000))
end

-- Queue an ended job for the resolution of its dependents (cheap when it has none).
local function ended(q, id, status)
  if has(q, 'has_deps', q.hasdeps) and redis.call('SREM', q.hasdeps, id) == 1 then
    work_[#work_ + 1] = {q.tag, id, status}
  end
end

-- Make a job ready: priority 0 in the list (tail, or head for `head`), else in the prio set;
-- at_front (`front`) before every priority, the latest first. `prio` nil: read the record's.
-- `since`: when it became ready (ms; a due job: its due time), for the order among equals.
local function place(q, id, head, front, prio, since)
  local rec = q.tag .. ':job:' .. id
  if prio == nil then prio = tonumber(redis.call('HGET', rec, 'priority')) or 0 end
  if prio == 0 and not front then
    if head then redis.call('LPUSH', q.ready, id) else redis.call('RPUSH', q.ready, id) end
  elseif prio == 0 and redis.call('EXISTS', q.prio) == 0 then
    -- at_front with nothing prioritized waiting: the head of the list, as older code did (its
    -- workers run it), marked so that it still goes before prioritized jobs pushed later
    -- (the record's `lf` tells reserve to unmark it).
    redis.call('LPUSH', q.ready, id)
    redis.call('SADD', q.fronts, id)
    redis.call('HSET', rec, 'lf', '1')
    q.has_fronts = true
  else
    q.has_prio = true
    local seq = redis.call('INCR', q.seq)
    local member, score
    if front then
      score, member = -MAXP - 1 - seq, string.format('1%013d%016d', now, seq) .. id
    elseif head then
      score, member = -prio, string.format('0%013d%016d', 0, SEQ_TOP - seq) .. id
    else
      score, member = -prio, string.format('1%013d%016d', since or now, seq) .. id
    end
    redis.call('ZADD', q.prio, score, member)
    redis.call('HSET', rec, 'pm', member)
  end
  wake_queue(q)
end

-- A due delayed job (`in_front`: it was in the front set) becomes ready.
local function place_due(q, id, in_front, due)
  if not in_front then
    redis.call('RPUSH', q.ready, id)
    wake_queue(q)
    return
  end
  local f = redis.call('HMGET', q.tag .. ':job:' .. id, 'priority', 'front')
  local prio = tonumber(f[1]) or 0
  -- In the front set without a priority: an at_front job (records of older code say nothing).
  local front = f[2] == '1' or prio == 0
  if f[2] then redis.call('HDEL', q.tag .. ':job:' .. id, 'front') end
  place(q, id, false, front, prio, due)
end

-- Delay a job that waits (retry, release, a released dependent): to the delayed set, and to
-- the front set when it must go to the prio set when due.
local function delay_job(q, id, due, prio, front)
  redis.call('ZADD', q.delayed, due, id)
  if front or (prio and prio ~= 0) then
    redis.call('SADD', q.front, id)
    if front then redis.call('HSET', q.tag .. ':job:' .. id, 'front', '1') end
  end
end

-- -- groups (issue #14) ------------------------------------------------------------------
-- One job per (queue, group) is in turn (<tag>:gturn names it): ready, delayed, retrying,
-- held by a limit or running, placed as any job. The others wait in the group's line
-- (<tag>:gline:<group>, status `queued`, not in any ready structure); <tag>:glen counts them
-- all. A line is never without a holder. Only an end of the holder passes the turn.

local function gline(q, g) return q.tag .. ':gline:' .. g end

-- A job of group `g` that may run now or later (pushed, released by its dependencies,
-- retried): true if it takes the turn (the caller places it as usual), else it joined the
-- line's tail (the caller writes its record: `queued`, with its due time).
local function join_group(q, id, g)
  q.has_groups = true
  if redis.call('HSETNX', q.gturn, g, id) == 1 or redis.call('HGET', q.gturn, g) == id then
    return true
  end
  redis.call('RPUSH', gline(q, g), id)
  redis.call('INCR', q.glen)
  return false
end

-- The holder of group `g`'s turn ended: the line's first job takes the turn, ready now
-- (behind the jobs already ready at its priority: fair between groups) or delayed until its
-- own due time (push time + delay). An empty line frees the group.
local function pass_turn(q, g)
  local line = gline(q, g)
  local nxt
  repeat
    nxt = redis.call('LPOP', line)
    if not nxt then
      redis.call('HDEL', q.gturn, g)
      return
    end
    redis.call('DECR', q.glen)
  until redis.call('HEXISTS', q.payloads, nxt) == 1
  redis.call('HSET', q.gturn, g, nxt)
  local rec = q.tag .. ':job:' .. nxt
  local f = redis.call('HMGET', rec, 'due_at', 'priority', 'front')
  local due, prio, front = tonumber(f[1]) or now, tonumber(f[2]) or 0, f[3] == '1'
  if due > now then
    redis.call('HSET', rec, 'status', 'scheduled')
    delay_job(q, nxt, due, prio, front)
  else
    if front then redis.call('HDEL', rec, 'front') end
    place(q, nxt, false, front, prio)
  end
end

-- Whether a live job of group `g` (not deferred) waits in the group's line (else it holds
-- the turn).
local function in_line(q, id, g)
  return redis.call('HGET', q.gturn, g) ~= id
end

-- -- limits -------------------------------------------------------------------------------

-- How many jobs wait in the queue's held lists (O(1) once <tag>:nheld exists; when it does
-- not, it is counted from the lists once and kept).
local function held_total(q)
  local n = tonumber(redis.call('GET', q.nheld))
  if n then return n end
  n = 0
  for _, key in ipairs(redis.call('SMEMBERS', q.heldkeys)) do
    n = n + redis.call('LLEN', q.tag .. ':held:' .. key)
  end
  redis.call('SET', q.nheld, n)
  return n
end

-- A held list just changed by `delta` jobs: the count follows (made afresh if missing: the
-- lists already show the change).
local function held_moved(q, delta)
  if redis.call('EXISTS', q.nheld) == 1 then
    redis.call('INCRBY', q.nheld, delta)
  else
    held_total(q)
  end
end

-- When the key's next start is allowed (ms; now or earlier: at once), or false when its
-- concurrency is full.
local function allowed_at(q, key, l)
  if (tonumber(l[4]) or 0) > 0 and redis.call('SCARD', q.tag .. ':running:' .. key)
      >= tonumber(l[4]) then
    return false
  end
  local int = tonumber(l[2]) or 0
  if int > 0 then
    return (tonumber(l[1]) or 0) - ((tonumber(l[3]) or 1) - 1) * int
  end
  return now
end

-- Let the first held job of `key` go (to the head of its level) if the key allows a start
-- now; else, for a rate, note when it will.
local function kick(q, key)
  local held = q.tag .. ':held:' .. key
  if redis.call('EXISTS', held) == 0 then return end
  local l = redis.call('HMGET', q.tag .. ':limit:' .. key, 'tat', 'int', 'burst', 'conc')
  local at = allowed_at(q, key, l)
  if not at then return end
  if at > now then
    redis.call('ZADD', q.limited, at, key)
    q.has_limited = true
    return
  end
  redis.call('ZREM', q.limited, key)
  local id = redis.call('LPOP', held)
  held_moved(q, -1)
  if redis.call('EXISTS', held) == 0 then redis.call('SREM', q.heldkeys, key) end
  place(q, id, true, false, nil)
end

-- A running job stopped (ack, release, reaped): its concurrency slot is free.
local function unlimit(q, id)
  if not has(q, 'has_runkey', q.runkey) then return end
  local key = redis.call('HGET', q.runkey, id)
  if not key then return end
  redis.call('HDEL', q.runkey, id)
  redis.call('SREM', q.tag .. ':running:' .. key, id)
  kick(q, key)
end

-- Whether a ready job with a limit (record fields f: lkey, lint, lburst, lconc) may start now;
-- if so its start is counted, else it is held back (keeping its place among its key's jobs).
local function admit(q, id, f)
  local key = f[1]
  local held = q.tag .. ':held:' .. key
  local lkey = q.tag .. ':limit:' .. key
  local int, burst, conc = tonumber(f[2]) or 0, tonumber(f[3]) or 1, tonumber(f[4]) or 0
  redis.call('HSET', lkey, 'int', int, 'burst', burst, 'conc', conc)
  local l = redis.call('HMGET', lkey, 'tat', 'int', 'burst', 'conc')
  local at = allowed_at(q, key, l)
  local rec = q.tag .. ':job:' .. id
  local was_held = f[5] == '1'
  local behind = not was_held and redis.call('EXISTS', held) == 1
  if behind or not at or at > now then
    if was_held then
      redis.call('LPUSH', held, id)
    else
      redis.call('RPUSH', held, id)
      redis.call('HSET', rec, 'held', '1')
    end
    redis.call('SADD', q.heldkeys, key)
    held_moved(q, 1)
    if behind then
      kick(q, key)
    elseif at then
      redis.call('ZADD', q.limited, at, key)
      q.has_limited = true
    end
    return false
  end
  if int > 0 then
    local tat = math.max(tonumber(l[1]) or 0, now) + int
    redis.call('HSET', lkey, 'tat', tat)
    redis.call('PEXPIRE', lkey, math.floor(tat - now) + 86400000)
  else
    redis.call('PEXPIRE', lkey, 86400000)
  end
  if conc > 0 then
    redis.call('SADD', q.tag .. ':running:' .. key, id)
    redis.call('HSET', q.runkey, id, key)
    q.has_runkey = true
  end
  if was_held then redis.call('HDEL', rec, 'held') end
  kick(q, key)
  return true
end

-- -- ending jobs that wait ------------------------------------------------------------------

-- Take a waiting job out of every structure that holds it (not running).
local function unplace(q, id, rec_status, f_pm, f_lkey)
  if rec_status == 'deferred' then
    redis.call('SREM', q.deferred, id)
    return
  end
  if f_pm then
    redis.call('ZREM', q.prio, f_pm)
  else
    redis.call('LREM', q.ready, 0, id)
    redis.call('SREM', q.fronts, id)
  end
  redis.call('ZREM', q.delayed, id)
  redis.call('SREM', q.front, id)
  if f_lkey then
    local held = q.tag .. ':held:' .. f_lkey
    local gone = redis.call('LREM', held, 0, id)
    if gone > 0 then
      held_moved(q, -gone)
      if redis.call('EXISTS', held) == 0 then
        redis.call('SREM', q.heldkeys, f_lkey)
        redis.call('ZREM', q.limited, f_lkey)
      end
    end
  end
end

-- End a job that is not running: `expired` or `cancelled`, with `err`. `take`: it is still in
-- a ready/delayed/deferred structure or its group's line (else the caller popped it already).
-- `tally`: what it counts as in the recent counts (default: `status`; a drop: `dropped`). A
-- group's turn holder passes the turn.
local function end_waiting(q, id, status, err, default_keep, take, tally)
  local rec = q.tag .. ':job:' .. id
  local f = redis.call('HMGET', rec, 'failure_ttl', 'unique_key', 'unique_for', 'status', 'pm',
    'lkey', 'group')
  local g = f[7]
  if g == '' or f[4] == 'deferred' then g = nil end
  local lined = g and in_line(q, id, g)
  if lined then
    if take and redis.call('LREM', gline(q, g), 1, id) > 0 then redis.call('DECR', q.glen) end
  elseif take then
    unplace(q, id, f[4], f[5], f[6])
  end
  redis.call('HDEL', q.payloads, id)
  redis.call('HDEL', q.attempts, id)
  redis.call('SREM', q.cancel, id)
  -- A key held by unique_for stays taken until it expires, whatever happens to the job.
  if f[2] and f[2] ~= '' and (f[3] or '0') == '0'
      and redis.call('GET', q.tag .. ':unique:' .. f[2]) == id then
    redis.call('DEL', q.tag .. ':unique:' .. f[2])
  end
  if f[4] == 'deferred' then
    redis.call('DEL', q.tag .. ':on:' .. id, q.tag .. ':wait:' .. id)
  end
  local keep = keep_of(f[1], default_keep)
  if keep > 0 then
    redis.call('HSET', rec, 'status', status, 'ended_at', now, 'error', err)
    redis.call('HDEL', rec, 'expires_at', 'pm', 'held', 'front', 'lf')
    redis.call('PEXPIRE', rec, keep)
  else
    redis.call('DEL', rec)
  end
  wake_waiters(q, id)
  count(q, tally or status)
  if g and not lined then pass_turn(q, g) end
  ended(q, id, status)
end

-- A running job ended (ack): free its limit slot; queue its dependents' resolution.
local function ended_running(q, id, status)
  unlimit(q, id)
  ended(q, id, status)
end

-- An ack's outcome count as sent (ack.lua's header): the count, and the outcomes' width (5;
-- 6 when sent negative: each outcome carries its info).
local function outcome_count(raw)
  local n = tonumber(raw)
  if n < 0 then return -n, 6 end
  return n, 5
end

-- Acknowledge one running job if the caller still holds it (`token`: its tries), writing
-- how it ended (keep ms 0: the record is deleted) and its info ('' none: issue #16, the
-- record's `info` field). Returns whether it was removed.
local function ack_one(q, id, token, status, keep, result, err, tb, info)
  if redis.call('HGET', q.attempts, id) ~= token then return false end
  redis.call('ZREM', q.reserved, id)
  redis.call('HDEL', q.payloads, id)
  redis.call('HDEL', q.attempts, id)
  local rec = q.tag .. ':job:' .. id
  local g = has(q, 'has_groups', q.gturn) and redis.call('HGET', rec, 'group')
  if g and g ~= '' and redis.call('HGET', q.gturn, g) == id then pass_turn(q, g) end
  if keep > 0 then
    redis.call('HSET', rec, 'status', status, 'ended_at', now, 'error', err, 'traceback', tb)
    if result ~= '' then redis.call('HSET', rec, 'result', result) end
    if info ~= '' then redis.call('HSET', rec, 'info', info) end
    redis.call('PEXPIRE', rec, keep)
  else
    redis.call('DEL', rec)
  end
  if q.has_cancels == nil then q.has_cancels = redis.call('EXISTS', q.cancel) == 1 end
  if q.has_cancels then redis.call('SREM', q.cancel, id) end
  wake_waiters(q, id)
  count(q, status)
  ended_running(q, id, status)
  return true
end

-- -- dependencies and workflow records --------------------------------------------------------

local function release_dependent(q, id)
  local rec = q.tag .. ':job:' .. id
  local f = redis.call('HMGET', rec, 'release_at', 'ttl', 'priority', 'front', 'group')
  redis.call('SREM', q.deferred, id)
  redis.call('DEL', q.tag .. ':on:' .. id, q.tag .. ':wait:' .. id)
  local due = math.max(now, tonumber(f[1]) or now)
  local ttl = tonumber(f[2]) or 0
  if ttl > 0 then redis.call('HSET', rec, 'expires_at', due + ttl) end
  if f[5] and f[5] ~= '' and not join_group(q, id, f[5]) then
    -- In its group's line until the turn comes (its `front` kept for then).
    redis.call('HSET', rec, 'status', 'queued', 'due_at', due)
    return
  end
  local prio = tonumber(f[3]) or 0
  local front = f[4] == '1'
  if due > now then
    redis.call('HSET', rec, 'status', 'scheduled', 'due_at', due)
    delay_job(q, id, due, prio, front)
  else
    redis.call('HSET', rec, 'status', 'queued', 'due_at', now)
    if front then redis.call('HDEL', rec, 'front') end
    place(q, id, false, front, prio)
  end
end

-- A workflow record's last member ended: it ends, by its counts.
local function end_record(q, id)
  local rec = q.tag .. ':job:' .. id
  local f = redis.call('HMGET', rec, 'p_total', 'p_failed', 'p_cancelled', 'rkeep', 'failure_ttl')
  local total, failed, cancelled = tonumber(f[1]) or 0, tonumber(f[2]) or 0, tonumber(f[3]) or 0
  local status, err, keep = 'succeeded', '', keep_of(f[4], 0)
  if failed > 0 then
    status, err = 'failed', failed .. ' of ' .. total .. ' members failed'
    keep = keep_of(f[5], 0)
  elseif cancelled > 0 then
    status, err = 'cancelled', cancelled .. ' of ' .. total .. ' members cancelled'
    keep = keep_of(f[5], 0)
  end
  redis.call('SREM', q.flows, id)
  redis.call('DEL', q.tag .. ':on:' .. id, q.tag .. ':wait:' .. id)
  if keep > 0 then
    redis.call('HSET', rec, 'status', status, 'ended_at', now, 'error', err)
    redis.call('PEXPIRE', rec, keep)
  else
    redis.call('DEL', rec)
  end
  wake_waiters(q, id)
  ended(q, id, status)
end

-- Cancel the members of record `id` that wait (and with `running`, ask running ones to stop).
-- A member that is itself a workflow record that has not ended is cancelled the same way: its
-- own members are (nested ones too), and it ends once they have. Returns nothing; the ends
-- resolve back into the records through the work list.
local function cancel_members(q, id, running, err)
  local stack = {{q, id}}
  while #stack > 0 do
    local rq, rid = stack[#stack][1], stack[#stack][2]
    stack[#stack] = nil
    local members = redis.call('LRANGE', rq.tag .. ':on:' .. rid, 0, -1)
    local wait = rq.tag .. ':wait:' .. rid
    local nested = {}
    for _, r in ipairs(members) do
      local mtag, mid = unref(r)
      local mq = Q(mtag)
      if redis.call('SISMEMBER', wait, r) == 1 then
        if far(mtag) then
          -- In another slot: relay.lua does the same there.
          emit(mtag, 'x', mid, running and '1' or '0', err)
        elseif redis.call('HEXISTS', mq.payloads, mid) == 1 then
          if redis.call('ZSCORE', mq.reserved, mid) then
            if running then redis.call('SADD', mq.cancel, mid) end
          else
            end_waiting(mq, mid, 'cancelled', err, 0, true)
          end
        elseif redis.call('SISMEMBER', mq.flows, mid) == 1 then
          nested[#nested + 1] = {mq, mid}
        end
      end
    end
    -- Pushed in reverse: the first nested record is taken next.
    for k = #nested, 1, -1 do stack[#stack + 1] = nested[k] end
  end
end

local function member_ended(q, id, status, cof)
  local rec = q.tag .. ':job:' .. id
  local field = 'p_' .. status
  if status == 'expired' then field = 'p_failed' end
  redis.call('HINCRBY', rec, field, 1)
  if (status == 'failed' or status == 'expired') and cof == '1'
      and redis.call('HSETNX', rec, 'cofdone', '1') == 1 then
    cancel_members(q, id, false, 'cancelled: a member of ' .. id .. ' failed')
  end
  if redis.call('SCARD', q.tag .. ':wait:' .. id) == 0 then end_record(q, id) end
end

-- Dependency `dep_id` (ref `dep_ref`) ended with `status`: resolve dependent `dref`.
local function resolve(dref, dep_ref, dep_id, status)
  local dtag, did = unref(dref)
  if far(dtag) then
    emit(dtag, 'r', dref, dep_ref, dep_id, status)
    return
  end
  local q = Q(dtag)
  local rec = dtag .. ':job:' .. did
  local f = redis.call('HMGET', rec, 'status', 'rule', 'kind', 'cof')
  if f[1] ~= 'deferred' then return end
  if redis.call('SREM', dtag .. ':wait:' .. did, dep_ref) == 0 then return end
  if f[3] == 'chain' or f[3] == 'batch' then
    member_ended(q, did, status, f[4])
    return
  end
  local left = redis.call('SCARD', dtag .. ':wait:' .. did)
  local bad = status == 'failed' or status == 'expired'
  local rule = f[2] or 'succeeded'
  if rule == 'ended' then
    if left == 0 then release_dependent(q, did) end
  elseif rule == 'failed' then
    if bad then
      release_dependent(q, did)
    elseif left == 0 then
      end_waiting(q, did, 'cancelled', 'no dependency failed', 0, true)
    end
  elseif status ~= 'succeeded' then
    end_waiting(q, did, 'cancelled', 'dependency ' .. dep_id .. ' ' .. status, 0, true)
  elseif left == 0 then
    release_dependent(q, did)
  end
end

-- Resolve the dependents of every job ended so far, and of those their ends end in turn.
local function settle()
  local i = 1
  while i <= #work_ do
    local tag, id, status = work_[i][1], work_[i][2], work_[i][3]
    work_[i] = false
    local key = tag .. ':deps:' .. id
    local dependents = redis.call('LRANGE', key, 0, -1)
    redis.call('DEL', key)
    local dep_ref = ref(tag, id)
    for _, d in ipairs(dependents) do resolve(d, dep_ref, id, status) end
    i = i + 1
  end
  work_ = {}
end

-- Write the tallies: ended counts per minute, wake tokens. `skip_wake`: a queue whose wake
-- list the script manages itself (reserve.lua).
local function flush(skip_wake)
  settle()
  for tag, c in pairs(counted_) do
    local counts = tag .. ':counts:' .. math.floor(now / 60000)
    for status, n in pairs(c) do redis.call('HINCRBY', counts, status, n) end
    redis.call('EXPIRE', counts, 10800)
  end
  counted_ = {}
  for tag in pairs(woken_) do
    if tag ~= skip_wake and redis.call('LLEN', tag .. ':wake') == 0 then
      redis.call('RPUSH', tag .. ':wake', '1')
    end
  end
  woken_ = {}
end
-- end of lib.lua
