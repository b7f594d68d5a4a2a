-- cancel.lua: cancel one job. A waiting job is removed from its queue and its record says
-- `cancelled` (kept for its failure_ttl); for a running one a request is stored in the cancel
-- set, which its worker polls (`cancel_requested`) and which reserve.lua and release.lua obey
-- should the job come back.
--
-- Key schema and record fields: see push.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 payloads, 5 attempts, 6 front, 7 cancel
-- ARGV: 1 job id, 2 tag, 3 failure_ttl ms for a record without one (pushed by wave-1 code)
-- Returns: 1 cancelled (it was waiting), 2 requested (it is running), 0 ended or unknown
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id, tag = ARGV[1], ARGV[2]
if redis.call('HEXISTS', KEYS[4], id) == 0 then
  return 0
end
if redis.call('ZSCORE', KEYS[3], id) then
  redis.call('SADD', KEYS[7], id)
  return 2
end
redis.call('LREM', KEYS[1], 0, id)
redis.call('ZREM', KEYS[2], id)
redis.call('SREM', KEYS[6], id)
redis.call('HDEL', KEYS[4], id)
redis.call('HDEL', KEYS[5], id)
local rec = tag .. ':job:' .. id
local f = redis.call('HMGET', rec, 'failure_ttl', 'unique_key', 'unique_for')
-- A key held by unique_for stays taken until it expires, whatever happens to the job.
if f[2] and f[2] ~= '' and (f[3] or '0') == '0'
    and redis.call('GET', tag .. ':unique:' .. f[2]) == id then
  redis.call('DEL', tag .. ':unique:' .. f[2])
end
-- Not trusted (a record written by hand): not a number counts as the default, NaN as 0, and a
-- keep past the longest one (3650 days) as that one, so that PEXPIRE never refuses it.
local keep = tonumber(f[1]) or tonumber(ARGV[3])
if keep ~= keep then keep = 0 end
keep = math.floor(math.min(keep, 315360000000))
if keep > 0 then
  redis.call('HSET', rec, 'status', 'cancelled', 'ended_at', now)
  redis.call('HDEL', rec, 'expires_at')
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
return 1
