-- routemq_take.lua: move up to n jobs out of one of RouteMQ's keys into an import's working hash.
--
-- Run on the server that holds RouteMQ's keys (`python main.py queue:import-routemq`, see
-- core/queue/drivers/redis_routemq.py). The move is atomic: a job is either still in RouteMQ's
-- key or in the working hash, never in both or neither, whenever the importer dies. Two keys
-- of RouteMQ's layout (no hash tag) in one script: a single server only, never a cluster.
--
-- KEYS: 1 the RouteMQ key: a list (pending `<p>:queue:<q>`, reserved `<p>:queue:<q>:reserved`,
--       failed `<p>:queue:failed:<q>`: taken from the head, the oldest first) or a sorted set
--       (delayed `<p>:queue:<q>:delayed`: the earliest due first), 2 the working hash
--       `<p>:import:working`, 3 the sequence counter `<p>:import:seq`
-- ARGV: 1 kind (pending/reserved/failed/delayed), 2 the queue's name, 3.. one fresh entry id
--       per job to take (the imported job's id)
-- Each job taken is stored as working[entry id] = "<kind>\n<queue>\n<seq>\n<score>\n<item>":
-- seq orders an interrupted import's leftovers as they were taken, score is the delayed job's
-- due time (epoch seconds; '' for the others), item RouteMQ's value byte for byte.
-- Returns: a flat list of (entry id, stored value) for the jobs taken; fewer than the ids
--          when the key ran out.
local kind, queue = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local item, score
  if kind == 'delayed' then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if #first == 0 then break end
    item, score = first[1], first[2]
    redis.call('ZREM', KEYS[1], item)
  else
    item = redis.call('LPOP', KEYS[1])
    if not item then break end
    score = ''
  end
  local seq = redis.call('INCR', KEYS[3])
  local value = kind .. '\n' .. queue .. '\n' .. seq .. '\n' .. score .. '\n' .. item
  redis.call('HSET', KEYS[2], ARGV[i], value)
  out[#out + 1] = ARGV[i]
  out[#out + 1] = value
end
return out
