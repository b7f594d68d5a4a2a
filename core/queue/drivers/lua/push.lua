-- push.lua: store jobs, ready now or after a delay, applying the id and unique-key rules.
--
-- Key schema (every key of a queue shares the hash tag {<prefix>:<queue>}, so a queue lives in
-- one Redis Cluster slot; <tag> below is `<prefix>:{<prefix>:<queue>}`):
--   <tag>:ready          list    job ids ready to run, the head first (at_front jobs pushed there)
--   <tag>:delayed        zset    job id -> time it becomes ready (ms)
--   <tag>:reserved       zset    job id -> time its lease expires (ms)
--   <tag>:payloads       hash    job id -> payload (JSON); present while waiting or running
--   <tag>:attempts       hash    job id -> tries started so far (the reservation token)
--   <tag>:wake           list    wake-up tokens for idle workers blocked in BLPOP
-- (the six above are the wave-1 keys, unchanged in meaning: a wave-1 worker can run these jobs)
--   <tag>:front          set     delayed at_front jobs (they go to the head when due)
--   <tag>:cancel         set     running jobs whose cancellation was asked for
--   <tag>:job:<id>       hash    the job's status record (fields below), kept after it ended
--                                for its keep time (PEXPIRE), never expiring while it lives
--   <tag>:unique:<key>   string  the id of the job holding unique key <key> (PX unique_for)
--   <tag>:waiter:<id>    string  set (PX) while someone waits for <id> to end
--   <tag>:waiters        string  set (PX) while someone waits for a job of the queue to end
--   <tag>:done:<id>      list    a token pushed when <id> ends and someone waits (PX 60 s)
--   <tag>:counts:<min>   hash    status -> jobs that ended so in that minute (EXPIRE 3 h)
-- Record fields (times in ms since the epoch, the server's clock): status, job, max_tries,
-- attempts, enqueued_at, due_at, started_at, ended_at, worker, error, traceback, result,
-- expires_at (due_at + ttl, until the first try starts), failure_ttl (ms), unique_key,
-- unique_for (ms).
-- Keys named <tag>:...:<id> are built here from ARGV[1] (the tag): they are in the same slot.
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 wake, 5 attempts, 6 reserved, 7 front
-- ARGV: 1 tag, 2 option set count m, then m option sets of 10: delay ms (0: ready now), job
--       class path, max_tries ('' unknown), at_front (1/0), check_id (1/0), unique key (''
--       none), unique_for ms, on_duplicate (reject/keep/replace), ttl ms (0 none), failure_ttl
--       ms; then per job 3: id, payload, the number of its option set (1..m). Jobs of one
--       bulk push usually share their options: they are sent once.
-- Returns: pairs of (outcome, id): outcome created/duplicate/kept/replaced, id the job that
--          holds the work (the new one, or the holder of the id or key)
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tag = ARGV[1]
local out = {}
local ready = 0

-- A job is waiting if its payload is stored and no worker holds it.
local function waiting(id)
  return redis.call('HEXISTS', KEYS[3], id) == 1 and not redis.call('ZSCORE', KEYS[6], id)
end

local sets = tonumber(ARGV[2])
for j = 3 + sets * 10, #ARGV, 3 do
  local id, payload = ARGV[j], ARGV[j + 1]
  -- ARGV[i + 2] .. ARGV[i + 11] are this job's 10 options, in the header's order.
  local i = 3 + (tonumber(ARGV[j + 2]) - 1) * 10 - 2
  local delay = tonumber(ARGV[i + 2])
  local ukey, dup = ARGV[i + 7], ARGV[i + 9]
  local outcome, holder = 'created', id
  local ufor = tonumber(ARGV[i + 8])

  if ARGV[i + 6] == '1' and redis.call('HEXISTS', KEYS[3], id) == 1 then
    -- The id is waiting or running.
    if dup == 'reject' then
      outcome = 'duplicate'
    elseif dup == 'replace' and not redis.call('ZSCORE', KEYS[6], id) then
      redis.call('HSET', KEYS[3], id, payload)
      redis.call('HSET', tag .. ':job:' .. id, 'job', ARGV[i + 3], 'max_tries', ARGV[i + 4])
      outcome = 'replaced'
    else
      outcome = 'kept'
    end
  elseif ukey ~= '' then
    local ukey_key = tag .. ':unique:' .. ukey
    local current = redis.call('GET', ukey_key)
    if current and current ~= id then
      if waiting(current) then
        holder = current
        if dup == 'reject' then
          outcome = 'duplicate'
        elseif dup == 'replace' then
          redis.call('HSET', KEYS[3], current, payload)
          redis.call('HSET', tag .. ':job:' .. current, 'job', ARGV[i + 3], 'max_tries', ARGV[i + 4])
          outcome = 'replaced'
        else
          outcome = 'kept'
        end
      elseif redis.call('PTTL', ukey_key) > 0 then
        -- Held for unique_for after dispatch, its holder running or ended.
        holder = current
        outcome = dup == 'reject' and 'duplicate' or 'kept'
      end
      -- Otherwise the holder runs (unique_for 0) or is gone: this job is its successor.
    end
  end

  if outcome == 'created' then
    local rec = tag .. ':job:' .. id
    if redis.call('HSET', KEYS[3], id, payload) == 0 then
      -- The id was already stored (a failed job retried before its worker's late ack landed):
      -- start it afresh, so that ack no longer matches and the tries really reset.
      redis.call('HDEL', KEYS[5], id)
      redis.call('ZREM', KEYS[6], id)
      redis.call('ZREM', KEYS[2], id)
      redis.call('LREM', KEYS[1], 0, id)
      redis.call('SREM', KEYS[7], id)
      redis.call('SREM', tag .. ':cancel', id)
    end
    -- A record of an earlier job with this id (ended, or reset above) is replaced.
    redis.call('DEL', rec, tag .. ':done:' .. id)
    local due = now + delay
    local fields = {
      'status', delay > 0 and 'scheduled' or 'queued', 'job', ARGV[i + 3],
      'max_tries', ARGV[i + 4], 'enqueued_at', now, 'due_at', due,
      'failure_ttl', ARGV[i + 11],
    }
    local ttl = tonumber(ARGV[i + 10])
    if ttl > 0 then
      fields[#fields + 1] = 'expires_at'
      fields[#fields + 1] = due + ttl
    end
    if ukey ~= '' then
      fields[#fields + 1] = 'unique_key'
      fields[#fields + 1] = ukey
      fields[#fields + 1] = 'unique_for'
      fields[#fields + 1] = ufor
      if ufor > 0 then
        redis.call('SET', tag .. ':unique:' .. ukey, id, 'PX', ufor)
      else
        redis.call('SET', tag .. ':unique:' .. ukey, id)
      end
    end
    redis.call('HSET', rec, unpack(fields))
    local front = ARGV[i + 5] == '1'
    if delay > 0 then
      redis.call('ZADD', KEYS[2], due, id)
      if front then redis.call('SADD', KEYS[7], id) end
    else
      if front then
        redis.call('LPUSH', KEYS[1], id)
      else
        redis.call('RPUSH', KEYS[1], id)
      end
      ready = ready + 1
    end
  end
  out[#out + 1] = outcome
  out[#out + 1] = holder
end
-- One token is enough: a worker that leaves jobs behind passes a token on (see reserve.lua).
if ready > 0 and redis.call('LLEN', KEYS[4]) == 0 then
  redis.call('RPUSH', KEYS[4], '1')
end
return out
