-- push.lua: store jobs, ready now or after a delay.
--
-- Key schema (every key of a queue shares the hash tag {<prefix>:<queue>}, so a queue lives in
-- one Redis Cluster slot):
--   <tag>:ready     list    job ids ready to run, oldest at the head
--   <tag>:delayed   zset    job id -> time it becomes ready (ms)
--   <tag>:reserved  zset    job id -> time its lease expires (ms)
--   <tag>:payloads  hash    job id -> payload (JSON)
--   <tag>:attempts  hash    job id -> tries started so far (the reservation token)
--   <tag>:wake      list    wake-up tokens for idle workers blocked in BLPOP
--
-- KEYS: 1 ready, 2 delayed, 3 payloads, 4 wake, 5 attempts, 6 reserved
-- ARGV: triples of (job id, payload, delay ms); delay 0 means ready now
-- Returns: the number of jobs stored
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ready = 0
for i = 1, #ARGV, 3 do
  local id, payload, delay = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if redis.call('HSET', KEYS[3], id, payload) == 0 then
    -- The id was already stored (a failed job retried before its worker's late ack landed):
    -- start it afresh, so that ack no longer matches and the tries really reset.
    redis.call('HDEL', KEYS[5], id)
    redis.call('ZREM', KEYS[6], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('LREM', KEYS[1], 0, id)
  end
  if delay > 0 then
    redis.call('ZADD', KEYS[2], now + delay, id)
  else
    redis.call('RPUSH', KEYS[1], id)
    ready = ready + 1
  end
end
-- One token is enough: a worker that leaves jobs behind passes a token on (see reserve.lua).
if ready > 0 and redis.call('LLEN', KEYS[4]) == 0 then
  redis.call('RPUSH', KEYS[4], '1')
end
return #ARGV / 3
