-- release.lua: put a reserved job back, now (tail of the queue) or after a delay.
-- With refund the try does not count and the job goes to the head (a stopping worker); its
-- record says `queued`. Otherwise it says `retrying`, with the error. A job whose
-- cancellation was asked for while it ran is cancelled instead: it never runs again.
--
-- A prioritized job goes back by its priority (lib.lua: `place`); its limit slot is freed.
-- Key schema and record fields: see push.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 attempts, 5 wake, 6 payloads, 7 cancel
-- ARGV: 1 job id, 2 attempts token, 3 delay ms, 4 refund (1 or 0), 5 tag, 6 error,
--       7 failure_ttl ms for a record without one (pushed by wave-1 code)
-- Returns: 1 if released, 2 if cancelled, 0 if the caller no longer held the reservation
local id, token, delay, refund = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local tag = ARGV[5]
local q = home(tag)
local rec = tag .. ':job:' .. id
if redis.call('HGET', KEYS[4], id) ~= token or redis.call('ZREM', KEYS[3], id) == 0 then
  return reply(0)
end
unlimit(q, id)
if redis.call('SREM', KEYS[7], id) == 1 then
  end_waiting(q, id, 'cancelled', ARGV[6], ARGV[7], false)
  flush(nil)
  return reply(2)
end
local prio
if refund then
  local attempts = redis.call('HINCRBY', KEYS[4], id, -1)
  redis.call('HSET', rec, 'status', 'queued', 'attempts', attempts, 'due_at', now + delay)
  prio = tonumber(redis.call('HGET', rec, 'priority')) or 0
else
  local f = redis.call('HMGET', rec, 'priority')
  redis.call('HSET', rec, 'status', 'retrying', 'error', ARGV[6], 'due_at', now + delay)
  prio = tonumber(f[1]) or 0
end
if delay > 0 then
  delay_job(q, id, now + delay, prio, false)
else
  place(q, id, refund, false, prio)
end
flush(nil)
return reply(1)
