-- retry_failed.lua: move failed records back to their queue, each only if it is still the
-- record the caller read (same record id); delete and push happen together.
--
-- Key schema: the failed store lives under the hash tag {<prefix>:failed}
--   <ftag>:records   hash   job id -> record (JSON)
--   <ftag>:rids      hash   job id -> record id (a new one each time a record is stored)
--   <ftag>:index     zset   job id -> failed_at (s)
--   <ftag>:queue:<q> zset   job id -> failed_at (s), the records of queue q
-- and the queue's keys under {<prefix>:<queue>} as in push.lua (the job's status record is
-- written afresh: `queued`, no tries). The script spans both tags: fine on a single Redis
-- server. On Redis Cluster (CLUSTER) only the queue's keys are sent (KEYS 5..10 below become
-- 1..6) and the record check and deletion are left out: the driver claims each record first
-- (failed_claim.lua: a new record id, so that two retries never both win), runs this script,
-- then deletes the records it moved by that id (failed_remove.lua, redis_relay.py). A crash
-- between the push and the deletion leaves the job in both places (a second retry pushes it
-- afresh), never in neither.
--
-- KEYS: 1 records, 2 rids, 3 index, 4 queue index,
--       5 ready, 6 delayed, 7 payloads, 8 wake, 9 attempts, 10 reserved
-- ARGV: 1 the queue's tag, then quadruples of (job id, record id, payload, class path); an
--       empty record id matches a record stored before record ids existed
-- Returns: the ids of the jobs moved back (by their priority: lib.lua), ready now with their
--          tries counted afresh (a job of a group: in its group's line if the turn is taken)
local tag = ARGV[1]
local q = home(tag)
local moved = {}
local base = CLUSTER and 0 or 4
local function K(n) return KEYS[base + n] end  -- the queue's: 1 ready .. 6 reserved
for i = 2, #ARGV, 4 do
  local id, rid, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if CLUSTER or (redis.call('HEXISTS', KEYS[1], id) == 1
      and (redis.call('HGET', KEYS[2], id) or '') == rid) then
    if not CLUSTER then
      redis.call('HDEL', KEYS[1], id)
      redis.call('HDEL', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
      redis.call('ZREM', KEYS[4], id)
    end
    if redis.call('HSET', K(3), id, payload) == 0 then
      -- Still stored (a late ack never landed): start afresh, as push.lua does.
      redis.call('HDEL', K(5), id)
      redis.call('ZREM', K(6), id)
      unlimit(q, id)
      redis.call('ZREM', K(2), id)
      redis.call('LREM', K(1), 0, id)
    end
    -- The job keeps its priority and its limit (lib.lua); its dependents stay as resolved.
    local rec = tag .. ':job:' .. id
    local kept = redis.call('HMGET', rec, 'priority', 'lkey', 'lint', 'lburst', 'lconc', 'pm',
      'group')
    if kept[6] then redis.call('ZREM', q.prio, kept[6]) end
    redis.call('DEL', rec, tag .. ':done:' .. id)
    redis.call('HSET', rec, 'status', 'queued', 'job', ARGV[i + 3],
      'attempts', 0, 'enqueued_at', now, 'due_at', now)
    if kept[1] then redis.call('HSET', rec, 'priority', kept[1]) end
    if kept[2] then
      redis.call('HSET', rec, 'lkey', kept[2], 'lint', kept[3], 'lburst', kept[4], 'lconc', kept[5])
    end
    -- And its group (when its record still tells it): the turn now, or the line's tail.
    local g = kept[7]
    if g and g ~= '' then redis.call('HSET', rec, 'group', g) end
    if not (g and g ~= '') or join_group(q, id, g) then
      place(q, id, false, false, tonumber(kept[1]) or 0)
    end
    moved[#moved + 1] = id
  end
end
flush(nil)
return moved
