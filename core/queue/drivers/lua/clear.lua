-- clear.lua: delete every job of a queue that is not reserved.
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 attempts, 5 wake
-- ARGV: none
-- Returns: the number of jobs deleted
local ids = redis.call('LRANGE', KEYS[1], 0, -1)
local delayed = redis.call('ZRANGE', KEYS[2], 0, -1)
for _, id in ipairs(delayed) do ids[#ids + 1] = id end
local deleted = 0
for _, id in ipairs(ids) do
  deleted = deleted + redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[5])
return deleted
