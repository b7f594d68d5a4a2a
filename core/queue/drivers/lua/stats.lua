-- stats.lua: how many jobs a queue holds in each state.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved
-- ARGV: none
-- Returns: {pending, delayed, reserved}
return {
  redis.call('LLEN', KEYS[1]),
  redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
}
