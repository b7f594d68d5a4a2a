-- reserve.lua: acknowledge finished jobs, then reserve up to `limit` ready jobs under a lease.
--
-- Before reserving it makes due delayed jobs ready (in due order) and returns jobs whose lease
-- expired to the head of the queue: every worker that reserves also reaps, atomically, so a due
-- or orphaned job is handed to exactly one worker.
--
-- KEYS: 1 ready, 2 delayed, 3 reserved, 4 payloads, 5 attempts, 6 wake
-- ARGV: 1 limit, 2 lease ms, 3 ack count n, then n pairs of (job id, attempts token)
-- Returns: {next_ms, id1, payload1, attempts1, id2, ...} where next_ms is, when nothing was
--          reserved, how long until a delayed job or a lease falls due (-1: none); else 0.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local limit, lease, acks = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])

for i = 4, 3 + acks * 2, 2 do
  local id, token = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[5], id) == token then
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('HDEL', KEYS[5], id)
  end
end

local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 1000)
if #due > 0 then
  redis.call('ZREM', KEYS[2], unpack(due))
  redis.call('RPUSH', KEYS[1], unpack(due))
end
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 1000)
if #expired > 0 then
  redis.call('ZREM', KEYS[3], unpack(expired))
  -- LPUSH reverses its arguments: push the newest first so the oldest ends at the head.
  for i = #expired, 1, -1 do
    redis.call('LPUSH', KEYS[1], expired[i])
  end
end

local out = {0}
if limit > 0 then
  local ids = redis.call('LPOP', KEYS[1], limit)
  if ids then
    for _, id in ipairs(ids) do
      local payload = redis.call('HGET', KEYS[4], id)
      -- No payload: the job was acknowledged after its lease had expired; it is done.
      if payload then
        local attempts = redis.call('HINCRBY', KEYS[5], id, 1)
        redis.call('ZADD', KEYS[3], now + lease, id)
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = attempts
      end
    end
  end
end

local left = redis.call('LLEN', KEYS[1])
if left == 0 then
  redis.call('DEL', KEYS[6])
elseif redis.call('LLEN', KEYS[6]) == 0 then
  -- Work remains: wake the next idle worker.
  redis.call('RPUSH', KEYS[6], '1')
end

if #out == 1 and left == 0 then
  local next_ms = -1
  local d = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if d[2] then next_ms = tonumber(d[2]) - now end
  local r = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if r[2] and (next_ms < 0 or tonumber(r[2]) - now < next_ms) then next_ms = tonumber(r[2]) - now end
  if next_ms == 0 then next_ms = 1 end
  out[1] = next_ms
end
return out
