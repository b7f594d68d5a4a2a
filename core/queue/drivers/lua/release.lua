-- release.lua: put a reserved job back, now (tail of the queue) or after a delay.
-- With refund the try does not count and the job goes to the head (a stopping worker); its
-- record says `queued`. Otherwise it says `retrying`, with the error. A job whose
-- cancellation was asked for while it ran is cancelled instead: it never runs again.
--
-- Key schema and record fields: see push.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 attempts, 5 wake, 6 payloads, 7 cancel
-- ARGV: 1 job id, 2 attempts token, 3 delay ms, 4 refund (1 or 0), 5 tag, 6 error,
--       7 failure_ttl ms for a record without one (pushed by wave-1 code)
-- Returns: 1 if released, 2 if cancelled, 0 if the caller no longer held the reservation
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id, token, delay, refund = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local tag = ARGV[5]
local rec = tag .. ':job:' .. id
if redis.call('HGET', KEYS[4], id) ~= token or redis.call('ZREM', KEYS[3], id) == 0 then
  return 0
end
if redis.call('SREM', KEYS[7], id) == 1 then
  redis.call('HDEL', KEYS[6], id)
  redis.call('HDEL', KEYS[4], id)
  -- Not trusted (a record written by hand), as in cancel.lua and reserve.lua.
  local keep = tonumber(redis.call('HGET', rec, 'failure_ttl')) or tonumber(ARGV[7])
  if keep ~= keep then keep = 0 end
  keep = math.floor(math.min(keep, 315360000000))
  if keep > 0 then
    redis.call('HSET', rec, 'status', 'cancelled', 'ended_at', now, 'error', ARGV[6])
    redis.call('PEXPIRE', rec, keep)
  else
    redis.call('DEL', rec)
  end
  if redis.call('EXISTS', tag .. ':waiters') == 1
    and redis.call('EXISTS', tag .. ':waiter:' .. id) == 1 then
    redis.call('RPUSH', tag .. ':done:' .. id, '1')
    redis.call('PEXPIRE', tag .. ':done:' .. id, 60000)
  end
  local counts = tag .. ':counts:' .. math.floor(now / 60000)
  redis.call('HINCRBY', counts, 'cancelled', 1)
  redis.call('EXPIRE', counts, 10800)
  return 2
end
if refund then
  local attempts = redis.call('HINCRBY', KEYS[4], id, -1)
  redis.call('HSET', rec, 'status', 'queued', 'attempts', attempts, 'due_at', now + delay)
else
  redis.call('HSET', rec, 'status', 'retrying', 'error', ARGV[6], 'due_at', now + delay)
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
