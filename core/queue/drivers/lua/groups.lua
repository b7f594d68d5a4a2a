-- groups.lua: a page of a queue's groups by name: the job in turn, how many wait in line.
--
-- Key schema: lib.lua (<tag>:gturn group -> holder, <tag>:gline:<group>). A line is never
-- without a holder, so the turn hash names every group that holds or waits for a turn. The
-- hash keeps no order: the page sorts its names, O(G log G) for the queue's G live groups
-- (a group leaves the hash when its last job ends), then O(limit) for the page.
--
-- KEYS: 1 <tag>:gturn
-- ARGV: 1 tag, 2 offset, 3 limit
-- Returns: {group1, holder1, waiting1, group2, ...}
local tag, offset, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local names = redis.call('HKEYS', KEYS[1])
table.sort(names)
local out = {}
for i = offset + 1, math.min(#names, offset + limit) do
  local g = names[i]
  out[#out + 1] = g
  out[#out + 1] = redis.call('HGET', KEYS[1], g) or ''
  out[#out + 1] = redis.call('LLEN', tag .. ':gline:' .. g)
end
return out
