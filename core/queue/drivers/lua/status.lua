-- status.lua: everything needed to tell one job's status, read at one instant.
--
-- Key schema and record fields: see push.lua. With a mark, records that someone waits for the
-- job to end (<tag>:waiter:<id>, and <tag>:waiters for the queue, so that the scripts ending
-- jobs look for waiters only while there are some): the scripts ending the job then push a
-- token to <tag>:done:<id>. The read itself is record.lua's (prepended), shared with browse.
--
-- KEYS: 1 payloads, 2 attempts, 3 reserved, 4 delayed (named for the slot; the keys read are
--       these, built from the tag)
-- ARGV: 1 job id, 2 tag, 3 waiter mark ms (0: none), 4 1 to push back a done token the
--       caller took (so that other waiters of the job wake too), else 0
-- Returns: record.lua's job_reply.
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
return job_reply(tag, id, now)
