-- record.lua: one job's status as read at one instant, shared by status.lua and browse.lua
-- (redis.py prepends it to them). Key schema and record fields: see push.lua; deferred jobs'
-- dependency keys (<tag>:on:<id>, <tag>:wait:<id>): lib.lua. Reads only keys under `tag`.
--
-- job_reply(tag, id, now) returns {now ms, payload ('' when the record has the class path) or
-- false, attempts or false, lease expiry or false, due time or false, the ids of the
-- dependencies not ended yet (of a deferred job), field1, value1, field2, ...} (the record's
-- fields; none if it has none). The payload is given only when the record lacks the class
-- path (wave-1 jobs).
local function job_reply(tag, id, now)
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
  local payloads = tag .. ':payloads'
  if has_job then
    payload = redis.call('HEXISTS', payloads, id) == 1 and '' or false
  else
    payload = redis.call('HGET', payloads, id)
  end
  local out = {
    now, payload, redis.call('HGET', tag .. ':attempts', id),
    redis.call('ZSCORE', tag .. ':reserved', id), redis.call('ZSCORE', tag .. ':delayed', id),
    waiting_for,
  }
  for i = 1, #record do out[#out + 1] = record[i] end
  return out
end
-- end of record.lua
