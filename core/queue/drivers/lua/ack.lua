-- ack.lua: remove finished jobs, if the caller still holds their reservation, and write how
-- each one ended in its status record.
--
-- Key schema: see push.lua.
--
-- KEYS: 1 reserved, 2 payloads, 3 attempts
-- ARGV: 1 tag, 2 outcome count m, then m outcomes of 5: status (succeeded/failed/cancelled/
--       expired), keep ms (0: the record is deleted), result ('' none: the JSON of a result is
--       never empty), error, traceback; then per job 3: id, attempts token, the number of its
--       outcome (1..m). Jobs that ended alike without a result share one outcome.
-- Each end resolves the job's dependents and frees its limit slot in this script (lib.lua).
-- Returns: the number of jobs removed
local tag = ARGV[1]
local q = Q(tag)
local removed = 0
local cancels = redis.call('EXISTS', tag .. ':cancel') == 1
local outcomes = tonumber(ARGV[2])
for j = 3 + outcomes * 5, #ARGV, 3 do
  local id, token = ARGV[j], ARGV[j + 1]
  -- ARGV[i + 2] .. ARGV[i + 6] are this job's outcome, in the header's order.
  local i = 3 + (tonumber(ARGV[j + 2]) - 1) * 5 - 2
  if redis.call('HGET', KEYS[3], id) == token then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    local status, keep, rec = ARGV[i + 2], tonumber(ARGV[i + 3]), tag .. ':job:' .. id
    if keep > 0 then
      redis.call('HSET', rec, 'status', status, 'ended_at', now, 'error', ARGV[i + 5],
        'traceback', ARGV[i + 6])
      if ARGV[i + 4] ~= '' then
        redis.call('HSET', rec, 'result', ARGV[i + 4])
      end
      redis.call('PEXPIRE', rec, keep)
    else
      redis.call('DEL', rec)
    end
    if cancels then redis.call('SREM', tag .. ':cancel', id) end
    wake_waiters(q, id)
    count(q, status)
    ended_running(q, id, status)
    removed = removed + 1
  end
end
flush(nil)
return removed
