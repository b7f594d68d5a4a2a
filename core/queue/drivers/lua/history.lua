-- history.lua: a queue's per-minute history, the last minutes up to the current one.
--
-- Key schema: see push.lua (<tag>:counts:<minute>, minute = ms since the epoch // 60000, the
-- server's clock). The scripts ending jobs count the ends there (lib.lua flush); workers add
-- their fields (redis.py add_history: HINCRBY into the same hashes, same EXPIRE).
--
-- KEYS: 1 <tag>:counts (not read itself: it names the slot)
-- ARGV: 1 minutes (the current one included), 2.. the field names, in the reply's order
-- Returns: {current minute, then per minute, oldest first, the fields' values (0 if absent)}
local t = redis.call('TIME')
local minute = math.floor((t[1] * 1000 + math.floor(t[2] / 1000)) / 60000)
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local out = {minute}
for m = minute - tonumber(ARGV[1]) + 1, minute do
  local v = redis.call('HMGET', KEYS[1] .. ':' .. m, unpack(fields))
  for i = 1, #fields do out[#out + 1] = tonumber(v[i]) or 0 end
end
return out
