-- release.lua: put a reserved job back, now (tail of the queue) or after a delay.
-- With refund the try does not count and the job goes to the head (a stopping worker).
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 attempts, 5 wake
-- ARGV: 1 job id, 2 attempts token, 3 delay ms, 4 refund (1 or 0)
-- Returns: 1 if released, 0 if the caller no longer held the reservation
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id, token, delay, refund = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
if redis.call('HGET', KEYS[4], id) ~= token or redis.call('ZREM', KEYS[3], id) == 0 then
  return 0
end
if refund then
  redis.call('HINCRBY', KEYS[4], id, -1)
end
if delay > 0 then
  redis.call('ZADD', KEYS[2], now + delay, id)
  return 1
end
if refund then
  redis.call('LPUSH', KEYS[1], id)
else
  redis.call('RPUSH', KEYS[1], id)
end
if redis.call('LLEN', KEYS[5]) == 0 then
  redis.call('RPUSH', KEYS[5], '1')
end
return 1
