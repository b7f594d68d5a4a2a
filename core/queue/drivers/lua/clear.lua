-- clear.lua: delete every job of a queue that is not reserved, with its status record (and
-- its unique key, when it still names the job).
--
-- Key schema and record fields: see push.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 attempts, 5 wake, 6 front
-- ARGV: 1 tag
-- Returns: the number of jobs deleted
local tag = ARGV[1]
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local delayed = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, id in ipairs(delayed) do ids[#ids + 1] = id end
local deleted = 0
for _, id in ipairs(ids) do
  deleted = deleted + redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  local rec = tag .. ':job:' .. id
  local ukey = redis.call('HGET', rec, 'unique_key')
  if ukey and ukey ~= '' and redis.call('GET', tag .. ':unique:' .. ukey) == id then
    redis.call('DEL', tag .. ':unique:' .. ukey)
  end
  redis.call('DEL', rec)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[5], KEYS[6])
return deleted
