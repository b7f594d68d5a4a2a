-- clear.lua: delete every job of a queue that is not reserved (ready, prioritized, delayed,
-- deferred, held back by a limit), with its status record (and its unique key, when it still
-- names the job). For whatever waits on them, the deleted jobs end as if cancelled, in this
-- script: their dependents in any queue are resolved with status `cancelled` (a "succeeded"
-- dependent is cancelled, an "ended" one may be released...) and a chain/batch record in any
-- queue counts them as cancelled members. The queue's own workflow records are not deleted:
-- they end with their members, as elsewhere. Dependents in this queue are deferred jobs, so
-- they are deleted before any resolution runs, which then ignores them.
--
-- Cost: O(n) in the deleted jobs (plus their dependents); the structures are read in slices
-- of SLICE, so no reply or table holds the whole queue at once, and no command takes more than
-- a slice of arguments.
--
-- Key schema and record fields: see push.lua and lib.lua.
--
-- Groups (lib.lua): the jobs in the lines are deleted too and the group state reset; a group
-- whose turn holder is running keeps its turn until that job ends (one job of a group at a
-- time).
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 attempts, 5 wake, 6 front
-- ARGV: 1 tag
-- Returns: the number of jobs deleted
local tag = ARGV[1]
local q = home(tag)
local SLICE = 1000
local deleted = 0

local function drop(id)
  deleted = deleted + redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  local rec = tag .. ':job:' .. id
  local ukey = redis.call('HGET', rec, 'unique_key')
  if ukey and ukey ~= '' and redis.call('GET', tag .. ':unique:' .. ukey) == id then
    redis.call('DEL', tag .. ':unique:' .. ukey)
  end
  redis.call('DEL', rec, tag .. ':on:' .. id, tag .. ':wait:' .. id)
  -- Its dependents (the deps list) are resolved by flush, once everything here is deleted.
  ended(q, id, 'cancelled')
end

-- A list read from its head, a slice at a time; then deleted.
local function drop_list(key)
  local from = 0
  while true do
    local ids = redis.call('LRANGE', key, from, from + SLICE - 1)
    for _, id in ipairs(ids) do drop(id) end
    if #ids < SLICE then break end
    from = from + SLICE
  end
  redis.call('DEL', key)
end

-- A sorted set read by rank, a slice at a time (`skip`: characters before the id in a member).
local function drop_zset(key, skip)
  local from = 0
  while true do
    local members = redis.call('ZRANGE', key, from, from + SLICE - 1)
    for _, m in ipairs(members) do drop(string.sub(m, skip + 1)) end
    if #members < SLICE then break end
    from = from + SLICE
  end
  redis.call('DEL', key)
end

-- A set emptied a slice at a time (SPOP: each member read once, whatever the set's size).
local function drop_set(key, each)
  while true do
    local members = redis.call('SPOP', key, SLICE)
    for _, m in ipairs(members) do each(m) end
    if #members < SLICE then break end
  end
end

drop_list(KEYS[1])
drop_zset(KEYS[2], 0)
drop_zset(q.prio, 30)  -- member: <band><13 digits><16 digits><id>
drop_set(q.deferred, drop)
drop_set(q.heldkeys, function(key) drop_list(tag .. ':held:' .. key) end)
local cursor = '0'
repeat
  local scan = redis.call('HSCAN', q.gturn, cursor, 'COUNT', SLICE)
  cursor = scan[1]
  for k = 1, #scan[2], 2 do
    local g, holder = scan[2][k], scan[2][k + 1]
    drop_list(gline(q, g))
    if not redis.call('ZSCORE', q.reserved, holder) then redis.call('HDEL', q.gturn, g) end
  end
until cursor == '0'
redis.call('DEL', q.glen, q.nheld)
redis.call('DEL', KEYS[5], KEYS[6], q.fronts, q.limited)
flush(nil)
return reply(deleted)
