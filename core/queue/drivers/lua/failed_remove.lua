-- failed_remove.lua: delete a failed record only if it is still this very record.
--
-- Key schema: see retry_failed.lua (the failed store, hash tag {<prefix>:failed}).
--
-- KEYS: 1 records, 2 rids, 3 index, 4 queue index
-- ARGV: 1 job id, 2 record id
-- Returns: 1 if deleted, 0 if the record is gone or is another failure now
local id = ARGV[1]
if redis.call('HEXISTS', KEYS[1], id) == 1 and (redis.call('HGET', KEYS[2], id) or '') == ARGV[2] then
  redis.call('HDEL', KEYS[1], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
  return 1
end
return 0
