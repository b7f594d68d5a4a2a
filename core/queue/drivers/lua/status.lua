-- status.lua: everything needed to tell one job's status, read at one instant.
--
-- Key schema and record fields: see push.lua. With a mark, records that someone waits for the
-- job to end (<tag>:waiter:<id>, and <tag>:waiters for the queue, so that the scripts ending
-- jobs look for waiters only while there are some): the scripts ending the job then push a
-- token to <tag>:done:<id>.
--
-- KEYS: 1 payloads, 2 attempts, 3 reserved, 4 delayed
-- ARGV: 1 job id, 2 tag, 3 waiter mark ms (0: none), 4 1 to push back a done token the
--       caller took (so that other waiters of the job wake too), else 0
-- Returns: {now ms, payload ('' when the record has the class path) or false, attempts or
--           false, lease expiry or false, due time or false, the ids of the dependencies not
--           ended yet (of a deferred job: lib.lua), field1, value1, field2, ...} (the record's fields; none if it has none).
--           The payload is given only when the record lacks the class path (wave-1 jobs).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local id, tag = ARGV[1], ARGV[2]
local mark = tonumber(ARGV[3])
if mark > 0 then
  -- Marks never shorten one another: several callers may wait.
  for _, key in ipairs({tag .. ':waiter:' .. id, tag .. ':waiters'}) do
    if redis.call('PTTL', key) < mark then
      redis.call('SET', key, '1', 'PX', mark)
    end
  end
end
if ARGV[4] == '1' then
  redis.call('RPUSH', tag .. ':done:' .. id, '1')
  redis.call('PEXPIRE', tag .. ':done:' .. id, 60000)
end
local record = redis.call('HGETALL', tag .. ':job:' .. id)
local payload = false
local has_job = false
local deferred, flow = false, false
for i = 1, #record, 2 do
  if record[i] == 'job' and record[i + 1] ~= '' then has_job = true end
  if record[i] == 'status' and record[i + 1] == 'deferred' then deferred = true end
  if record[i] == 'kind' then flow = true end
end
local waiting_for = {}
if deferred and not flow then
  local wait = tag .. ':wait:' .. id
  for _, r in ipairs(redis.call('LRANGE', tag .. ':on:' .. id, 0, -1)) do
    if redis.call('SISMEMBER', wait, r) == 1 then
      waiting_for[#waiting_for + 1] = string.sub(r, string.find(r, '\0', 1, true) + 1)
    end
  end
end
if has_job then
  payload = redis.call('HEXISTS', KEYS[1], id) == 1 and '' or false
else
  payload = redis.call('HGET', KEYS[1], id)
end
local out = {
  now, payload, redis.call('HGET', KEYS[2], id), redis.call('ZSCORE', KEYS[3], id),
  redis.call('ZSCORE', KEYS[4], id), waiting_for,
}
for i = 1, #record do out[#out + 1] = record[i] end
return out
