-- extend.lua: renew the leases of running jobs, if the caller still holds their reservation.
--
-- KEYS: 1 reserved, 2 attempts
-- ARGV: triples of (job id, attempts token, lease ms from now)
-- Returns: the number of leases renewed
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local renewed = 0
for i = 1, #ARGV, 3 do
  local id, token, lease = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if redis.call('HGET', KEYS[2], id) == token then
    renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', now + lease, id)
  end
end
return renewed
