-- prune.lua: delete ended status records that ended before a cutoff, whatever their keep time
-- (`queue:prune --older-than`, django-db-queue's delete_old_jobs). The caller found the keys
-- with SCAN over the queue's <tag>:job:* (one slot); each is read again here, so a record
-- rewritten since (its id pushed again) is left alone. Waiting, deferred and running jobs'
-- records are never deleted; workflow records (kind chain/batch) that ended are ended records.
-- A deleted record's `done` token (<tag>:done:<id>) goes with it.
--
-- Key schema and record fields: see push.lua.
--
-- KEYS: the records to look at (<tag>:job:<id>, all of one queue)
-- ARGV: 1 tag, 2 cutoff (ms since the epoch, may have a fraction): records with ended_at
--       below it go
-- Returns: the number of records deleted
local tag, cutoff = ARGV[1], tonumber(ARGV[2])
local ENDED = {succeeded = true, failed = true, cancelled = true, expired = true}
local prefix = tag .. ':job:'
local deleted = 0
for _, key in ipairs(KEYS) do
  local f = redis.call('HMGET', key, 'status', 'ended_at')
  local ended_at = tonumber(f[2])
  if f[1] and ENDED[f[1]] and ended_at and ended_at < cutoff
      and string.sub(key, 1, #prefix) == prefix then
    local id = string.sub(key, #prefix + 1)
    -- A job stored under the id again (its payload back) is not the ended one.
    if redis.call('HEXISTS', tag .. ':payloads', id) == 0 then
      redis.call('DEL', key, tag .. ':done:' .. id)
      deleted = deleted + 1
    end
  end
end
return deleted
