-- browse.lua: a page of a queue's jobs in one state, with their records (one round trip).
--
-- Key schema: push.lua and lib.lua; every key read is under the queue's tag (one slot).
-- Orders and costs (n = offset + limit):
--   pending   the order reserve.lua hands jobs out: at_front jobs of the prio set, at_front
--             jobs at the head of the ready list, higher priorities, the ready list, lower
--             priorities (five runs, each a range of the list or the prio set: the offset is a
--             jump, O(log N + offset) for the list's LRANGE, in C); then jobs held back by a
--             limit (<tag>:held:<key>, by key name); then the jobs waiting in group lines
--             (<tag>:gline:<group>, by group name), a whole list before the offset skipped by
--             its length: plus O(limit keys) and, only when the page reaches the lines,
--             O(groups) for the names. The held and line jobs are shown where they wait now:
--             when they start depends on limits and turns to come.
--   delayed   by due time (<tag>:delayed): O(log N + limit).
--   reserved  by lease expiry (<tag>:reserved): O(log N + limit).
--   deferred  in push order (the record's enqueued_at, then its dseq: push.lua numbers the
--             jobs of one call; records of older code have none, then by id): the set keeps
--             no order, so the page sorts it, O(D log D) for D deferred jobs (jobs waiting for
--             dependencies: few, beside the ready ones). SORT BY cannot: Cluster refuses BY.
-- The records are record.lua's job_reply (prepended).
--
-- KEYS: 1 ready (names the slot)
-- ARGV: 1 tag, 2 state (pending/delayed/reserved/deferred), 3 offset, 4 limit
-- Returns: {id1, job_reply of id1, id2, ...}: the page's jobs in order.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tag, state = ARGV[1], ARGV[2]
local offset, limit = tonumber(ARGV[3]), tonumber(ARGV[4])
if limit <= 0 then return {} end
local MAXP = 2147483647
local ids = {}
local seen = 0 -- jobs of the order passed so far (those before the offset are not kept)

-- `payloads`: the ready structures' entries of the page are checked to still have a payload
-- (entries left by late acks are skipped, as reserve skips them; those before the offset are
-- counted unchecked: such a stale entry shifts the page by one, never costs a read each).
local function emit(id, payloads)
  if seen >= offset then
    if payloads and redis.call('HEXISTS', payloads, id) == 0 then return end
    ids[#ids + 1] = id
  end
  seen = seen + 1
end

local function full() return #ids >= limit end

-- A whole list in order: skipped by its length while it lies before the offset.
local function emit_list(key)
  local n = redis.call('LLEN', key)
  if seen + n <= offset then
    seen = seen + n
    return
  end
  local from = math.max(0, offset - seen)
  seen = seen + from
  for _, id in ipairs(redis.call('LRANGE', key, from, from + limit - #ids - 1)) do emit(id) end
end

-- Positions [from, to) of a list or the prio set (its members end with the id: lib.lua),
-- jumped to by index: entries before the offset are counted, not read.
local function emit_range(key, zset, from, to, payloads)
  local n = to - from
  if n <= 0 then return end
  if seen + n <= offset then
    seen = seen + n
    return
  end
  local at = from + math.max(0, offset - seen)
  seen = seen + (at - from)
  while at < to and not full() do
    local want = math.min(to - at, limit - #ids + 16) -- a few more, for stale entries
    local got = redis.call(zset and 'ZRANGE' or 'LRANGE', key, at, at + want - 1)
    if #got == 0 then return end
    for _, m in ipairs(got) do
      if full() then return end
      emit(zset and string.sub(m, 31) or m, payloads)
    end
    at = at + #got
  end
end

if state == 'pending' then
  -- reserve.lua's pop_next takes the prio set's first member while its score is below -MAXP
  -- (at_front), then list heads that are at_front jobs (<tag>:fronts), then prio members
  -- below 0 (priorities above 0), then the list, then the rest of the set: the order is five
  -- runs, each a range of the set or the list, whose bounds ZCOUNT and the fronts tell.
  local ready, prio, fronts = tag .. ':ready', tag .. ':prio', tag .. ':fronts'
  local payloads = tag .. ':payloads'
  local nlist, nprio = redis.call('LLEN', ready), redis.call('ZCARD', prio)
  local first = redis.call('ZCOUNT', prio, '-inf', '(' .. -MAXP)
  local high = redis.call('ZCOUNT', prio, '-inf', '(0')
  local lead = 0 -- at_front jobs at the list's head: at most as many as the fronts set holds
  local nfronts = redis.call('SCARD', fronts)
  if nfronts > 0 then
    for _, id in ipairs(redis.call('LRANGE', ready, 0, nfronts - 1)) do
      if redis.call('SISMEMBER', fronts, id) == 0 then break end
      lead = lead + 1
    end
  end
  emit_range(prio, true, 0, first, payloads)
  emit_range(ready, false, 0, lead, payloads)
  emit_range(prio, true, first, high, payloads)
  emit_range(ready, false, lead, nlist, payloads)
  emit_range(prio, true, high, nprio, payloads)
  if not full() then
    local keys = redis.call('SMEMBERS', tag .. ':heldkeys')
    table.sort(keys)
    for _, key in ipairs(keys) do
      if full() then break end
      emit_list(tag .. ':held:' .. key)
    end
  end
  if not full() and (tonumber(redis.call('GET', tag .. ':glen')) or 0) > 0 then
    local groups = redis.call('HKEYS', tag .. ':gturn')
    table.sort(groups)
    for _, g in ipairs(groups) do
      if full() then break end
      emit_list(tag .. ':gline:' .. g)
    end
  end
elseif state == 'delayed' or state == 'reserved' then
  ids = redis.call('ZRANGE', tag .. ':' .. state, offset, offset + limit - 1)
elseif state == 'deferred' then
  local members = redis.call('SMEMBERS', tag .. ':deferred')
  local at, seq = {}, {}
  for _, id in ipairs(members) do
    local f = redis.call('HMGET', tag .. ':job:' .. id, 'enqueued_at', 'dseq')
    at[id], seq[id] = tonumber(f[1]) or 0, tonumber(f[2]) or 0
  end
  table.sort(members, function(a, b)
    if at[a] ~= at[b] then return at[a] < at[b] end
    if seq[a] ~= seq[b] then return seq[a] < seq[b] end
    return a < b
  end)
  for i = offset + 1, math.min(#members, offset + limit) do ids[#ids + 1] = members[i] end
else
  return redis.error_reply('unknown state ' .. state)
end

local out = {}
for _, id in ipairs(ids) do
  out[#out + 1] = id
  out[#out + 1] = job_reply(tag, id, now)
end
return out
