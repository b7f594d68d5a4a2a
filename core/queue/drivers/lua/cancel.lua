-- cancel.lua: cancel one job. A waiting job (ready, delayed, deferred or held back by its
-- limit) is removed from its queue and its record says `cancelled` (kept for its failure_ttl),
-- its dependents resolved in this script; for a running one a request is stored in the cancel
-- set, which its worker polls (`cancel_requested`) and which reserve.lua and release.lua obey
-- should the job come back. A workflow record (chain/batch) that has not ended: its members
-- that wait are cancelled and its running ones asked to stop; it ends once they have.
--
-- Key schema and record fields: see push.lua and lib.lua.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 payloads, 5 attempts, 6 front, 7 cancel
-- ARGV: 1 job id, 2 tag, 3 failure_ttl ms for a record without one (pushed by wave-1 code)
-- Returns: 1 cancelled (it was waiting, or a record that had not ended), 2 requested (it is
--          running), 0 ended or unknown
local id, tag = ARGV[1], ARGV[2]
local q = home(tag)
if redis.call('SISMEMBER', q.flows, id) == 1 then
  local kind = redis.call('HGET', tag .. ':job:' .. id, 'kind') or 'workflow'
  cancel_members(q, id, true, 'cancelled with its ' .. kind .. ' ' .. id)
  flush(nil)
  return reply(1)
end
if redis.call('HEXISTS', KEYS[4], id) == 0 then
  return reply(0)
end
if redis.call('ZSCORE', KEYS[3], id) then
  redis.call('SADD', KEYS[7], id)
  return reply(2)
end
end_waiting(q, id, 'cancelled', '', ARGV[3], true)
flush(nil)
return reply(1)
