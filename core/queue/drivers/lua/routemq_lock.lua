-- routemq_lock.lua: compare-and-set on the lock an import of RouteMQ's keys holds.
--
-- One import at a time per source and prefix (core/queue/drivers/redis_routemq.py): a second
-- one would push the first one's working entries while it pushes them too.
--
-- KEYS: 1 the lock `<p>:import:lock` (string: "<host> <pid> <token>" of its holder)
-- ARGV: 1 op: `take` (set it if it is free or still held by ARGV[2], the holder found dead),
--       `renew` (extend it if ARGV[3] holds it), `release` (delete it if ARGV[3] holds it);
--       2 the dead holder to take over ('' none), 3 this import's holder string, 4 lease ms
-- Returns: take: 1, or the current holder's string; renew/release: 1 if done, else 0
local op, current = ARGV[1], redis.call('GET', KEYS[1])
if op == 'take' then
  if not current or (ARGV[2] ~= '' and current == ARGV[2]) then
    redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
    return 1
  end
  return current
end
if current ~= ARGV[3] then return 0 end
if op == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('DEL', KEYS[1])
end
return 1
