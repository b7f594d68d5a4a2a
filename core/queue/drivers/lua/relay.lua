-- relay.lua: on Redis Cluster, apply the messages other queues' scripts addressed to this
-- queue (lib.lua, "THE RELAY": the message formats). redis_relay.py sends them here, then
-- removes them from the outbox they came from. Each message may come more than once (a
-- deliverer that died before the removal, a sweeper beside the first deliverer): every kind is
-- idempotent.
--   'r' resolve: lib.lua's `resolve`, guarded by the SREM of the dependency from the
--       dependent's wait set (a second one finds it gone and does nothing).
--   's' subscribe: a job pushed in another queue depends on <id> of this one. Live (a payload,
--       or a record that has not ended): the dependent joins <id>'s deps list, once (LPOS).
--       Ended: the dependent is resolved at once (an 'r' back). Unknown (the dependency was
--       found by the driver before the push, and its record is gone since: an end with keep
--       0, a clear): it resolves as a dependency `cancelled`.
--   'x' cancel a workflow member: as cancel_members does in one slot (a waiting job ends
--       `cancelled`; a running one is asked to stop when `running`; a record that has not
--       ended cancels its own members). Done again, it finds nothing waiting.
-- Whatever these ends reach in other queues goes to this queue's outbox in turn.
--
-- KEYS: 1 the queue's outbox (<tag>:outbox: names the slot)
-- ARGV: 1 the queue's tag, then the messages (JSON, as appended)
-- Returns: lib.lua's reply: {refused, the messages appended, stale}; refused: per message
-- not applied, its number (1 = ARGV[2]) and why, flat
local tag = ARGV[1]
local q = home(tag)
local ENDED = {succeeded = true, failed = true, cancelled = true, expired = true}
local function apply(m)
  local kind = m[4]
  if kind == 'r' then
    resolve(m[5], m[6], m[7], m[8])
  elseif kind == 's' then
    local id, dref = m[5], m[6]
    local st = redis.call('HGET', tag .. ':job:' .. id, 'status')
    if st and ENDED[st] then
      resolve(dref, ref(tag, id), id, st)
    elseif st or redis.call('HEXISTS', q.payloads, id) == 1 then
      local deps = tag .. ':deps:' .. id
      if not redis.call('LPOS', deps, dref) then
        redis.call('RPUSH', deps, dref)
        redis.call('SADD', q.hasdeps, id)
        q.has_deps = true
      end
    else
      resolve(dref, ref(tag, id), id, 'cancelled')
    end
  elseif kind == 'x' then
    local id, running, err = m[5], m[6] == '1', m[7]
    if redis.call('HEXISTS', q.payloads, id) == 1 then
      if redis.call('ZSCORE', q.reserved, id) then
        if running then redis.call('SADD', q.cancel, id) end
      else
        end_waiting(q, id, 'cancelled', err, 0, true)
      end
    elseif redis.call('SISMEMBER', q.flows, id) == 1 then
      cancel_members(q, id, running, err)
    end
  else
    error('unknown message kind ' .. tostring(kind))
  end
end

-- Each message on its own: one that cannot be applied (not JSON, another queue's, an unknown
-- kind, an error while applying it) is refused and the others applied; the caller sets the
-- refused ones aside (redis_relay.py).
local refused = {}
for i = 2, #ARGV do
  local ok, m = pcall(cjson.decode, ARGV[i])
  local why = nil
  if not ok or type(m) ~= 'table' then
    why = 'not a JSON array'
  elseif m[3] ~= tag then
    why = 'a message for ' .. tostring(m[3]) .. ' sent to ' .. tag
  else
    local done, err = pcall(apply, m)
    if not done then
      why = type(err) == 'table' and tostring(err.err) or tostring(err)
    end
  end
  if why then
    refused[#refused + 1] = i - 1
    refused[#refused + 1] = why
  end
end
flush(nil)
return reply(refused)
