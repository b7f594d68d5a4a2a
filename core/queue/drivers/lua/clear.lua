-- clear.lua: delete every job of a queue that is not reserved (ready, prioritized, delayed,
-- deferred, held back by a limit), with its status record (and its unique key, when it still
-- names the job), and the workflow records of the queue that have not ended. Dependents of the
-- deleted jobs in other queues are left as they are (their dependency's record is gone).
--
-- Key schema and record fields: see push.lua and lib.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 attempts, 5 wake, 6 front
-- ARGV: 1 tag
-- Returns: the number of jobs deleted
local tag = ARGV[1]
local q = Q(tag)
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local function add(list) for _, id in ipairs(list) do ids[#ids + 1] = id end end
add(redis.call('ZRANGE', KEYS[2], 0, -1))
add(redis.call('SMEMBERS', q.deferred))
for _, m in ipairs(redis.call('ZRANGE', q.prio, 0, -1)) do ids[#ids + 1] = string.sub(m, 31) end
local drop = {KEYS[1], KEYS[2], KEYS[5], KEYS[6], q.prio, q.fronts, q.deferred, q.flows, q.heldkeys,
  q.limited}
for _, key in ipairs(redis.call('SMEMBERS', q.heldkeys)) do
  add(redis.call('LRANGE', tag .. ':held:' .. key, 0, -1))
  drop[#drop + 1] = tag .. ':held:' .. key
end
local deleted = 0
for _, id in ipairs(ids) do
  deleted = deleted + redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  local rec = tag .. ':job:' .. id
  local ukey = redis.call('HGET', rec, 'unique_key')
  if ukey and ukey ~= '' and redis.call('GET', tag .. ':unique:' .. ukey) == id then
    redis.call('DEL', tag .. ':unique:' .. ukey)
  end
  redis.call('DEL', rec, tag .. ':deps:' .. id, tag .. ':on:' .. id, tag .. ':wait:' .. id)
  redis.call('SREM', q.hasdeps, id)
end
for _, id in ipairs(redis.call('SMEMBERS', q.flows)) do
  redis.call('DEL', tag .. ':job:' .. id, tag .. ':deps:' .. id, tag .. ':on:' .. id,
    tag .. ':wait:' .. id)
  redis.call('SREM', q.hasdeps, id)
end
redis.call('DEL', unpack(drop))
return deleted
