-- ack.lua: remove finished jobs, if the caller still holds their reservation, and write how
-- each one ended in its status record.
--
-- Key schema: see push.lua.
--
-- KEYS: 1 reserved, 2 payloads, 3 attempts
-- ARGV: 1 tag, 2 outcome count m, then m outcomes of 5: status (succeeded/failed/cancelled/
--       expired), keep ms (0: the record is deleted), result ('' none: the JSON of a result is
--       never empty), error, traceback; then per job 3: id, attempts token, the number of its
--       outcome (1..m). Jobs that ended alike without a result share one outcome.
--       A count written -m means outcomes of 6: the sixth is the outcome's info (issue #16:
--       a JSON object, '' none), kept as the record's `info` field. Calls whose outcomes
--       carry no info send the count as is: the plain path's arguments are unchanged.
-- Each end resolves the job's dependents and frees its limit slot in this script (lib.lua).
-- Returns: the number of jobs removed
local tag = ARGV[1]
local q = home(tag)
local removed = 0
local outcomes, width = outcome_count(ARGV[2])
for j = 3 + outcomes * width, #ARGV, 3 do
  -- ARGV[i + 2] .. ARGV[i + 6] (+ 7: info) are this job's outcome, in the header's order.
  local i = 3 + (tonumber(ARGV[j + 2]) - 1) * width - 2
  if ack_one(q, ARGV[j], ARGV[j + 1], ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4],
      ARGV[i + 5], ARGV[i + 6], width == 6 and ARGV[i + 7] or '') then
    removed = removed + 1
  end
end
flush(nil)
return reply(removed)
