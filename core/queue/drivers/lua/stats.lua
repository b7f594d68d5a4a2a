-- stats.lua: how many jobs a queue holds in each state.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved
-- ARGV: 1 tag
-- Returns: {pending (ready, prioritized, held back by a limit, in a group's line), delayed,
--          reserved, deferred}
local tag = ARGV[1]
local pending = redis.call('LLEN', KEYS[1]) + redis.call('ZCARD', tag .. ':prio')
  + (tonumber(redis.call('GET', tag .. ':glen')) or 0)
for _, key in ipairs(redis.call('SMEMBERS', tag .. ':heldkeys')) do
  pending = pending + redis.call('LLEN', tag .. ':held:' .. key)
end
return {
  pending,
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  redis.call('SCARD', tag .. ':deferred'),
}
