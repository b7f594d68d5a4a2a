-- recent.lua: how many jobs of a queue ended each way over the last minutes.
--
-- Key schema: see push.lua (<tag>:counts:<minute>, minute = ms since the epoch // 60000).
--
-- KEYS: 1 <tag>:counts (not read itself: it names the slot)
-- ARGV: 1 window in whole minutes (the current one included)
-- Returns: {succeeded, failed, cancelled, expired, coalesced, dropped, rejected} (the last
--          three counted by push.lua: replaced payloads, drops and refusals by max_length)
local t = redis.call('TIME')
local minute = math.floor((t[1] * 1000 + math.floor(t[2] / 1000)) / 60000)
local totals = {0, 0, 0, 0, 0, 0, 0}
for m = minute - tonumber(ARGV[1]) + 1, minute do
  local v = redis.call('HMGET', KEYS[1] .. ':' .. m, 'succeeded', 'failed', 'cancelled', 'expired',
    'coalesced', 'dropped', 'rejected')
  for i = 1, 7 do totals[i] = totals[i] + tonumber(v[i] or '0') end
end
return totals
