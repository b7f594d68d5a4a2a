-- ack.lua: remove finished jobs, if the caller still holds their reservation.
--
-- KEYS: 1 reserved, 2 payloads, 3 attempts
-- ARGV: pairs of (job id, attempts token)
-- Returns: the number of jobs removed
local removed = 0
for i = 1, #ARGV, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[3], id) == token then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    removed = removed + 1
  end
end
return removed
