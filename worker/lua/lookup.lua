-- KEYS: the families of summaries (P.."cm")
-- ARGV: prefix, id...
-- The statuses of intents whose whole record is gone (summary.lua): per id its record, compacted
-- (`x` set, no payload), as JSON, or false where there is no summary either.
local out = {}
for k = 2, #ARGV do
  local raw = summary_get(ARGV[k])
  if raw then out[#out + 1] = summary_json(summary_rec(raw)) else out[#out + 1] = false end
end
return out
