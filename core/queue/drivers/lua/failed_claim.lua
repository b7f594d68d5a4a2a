-- failed_claim.lua: give a failed record a new record id, if it is still the record the
-- caller read. Two callers claiming one record: exactly one succeeds.
--
-- Key schema: see retry_failed.lua (the failed store, hash tag {<prefix>:failed}).
--
-- KEYS: 1 records, 2 rids
-- ARGV: 1 job id, 2 record id as read ('' for a record stored before record ids), 3 new id
-- Returns: 1 if claimed, 0 if the record is gone or is another failure now
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 1 and (redis.call('HGET', KEYS[2], id) or '') == ARGV[2] then
  redis.call('HSET', KEYS[2], id, ARGV[3])
  return 1
end
return 0
