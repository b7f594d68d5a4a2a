-- save_payload.lua: replace a running job's payload (a multi-step job's checkpoint, RQ's
-- save_meta), only while the caller still holds its reservation: the attempts token is the
-- caller's try (as release.lua checks it) and the job is in the reserved set (a lease taken
-- over by a reserve that reaped it is no longer held). What reads the payload afterwards (a
-- release or retry, the redelivery of a lost lease, the failed store's record of the worker)
-- reads the new one: they all read <tag>:payloads.
--
-- Key schema: see push.lua.
--
-- KEYS: 1 reserved, 2 payloads, 3 attempts
-- ARGV: 1 job id, 2 attempts token, 3 the new payload
-- Returns: 1 if written, 0 if the caller no longer held the reservation (nothing written)
local id = ARGV[1]
if redis.call('HGET', KEYS[3], id) ~= ARGV[2] or not redis.call('ZSCORE', KEYS[1], id) then
  return 0
end
redis.call('HSET', KEYS[2], id, ARGV[3])
return 1
