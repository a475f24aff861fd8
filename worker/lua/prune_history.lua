-- KEYS: the pruning cursor (the next bucket of the history index to look at), the index's meta
-- ARGV: prefix, head budget, bucket budget
-- Drops the history heads whose record and summary are both gone (index.lua, remember), a few
-- buckets per call: from the cursor on, whole buckets, until `budget` heads or `buckets` buckets
-- were looked at; then moves the cursor on. Run by the sweep, so every head of an expired intent
-- goes within a pass over the index's buckets. Returns {buckets looked at, heads dropped,
-- buckets in the index}.
local cursor_key, budget, max_buckets = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local m = h_state().m
local bucket = (tonumber(redis.call('GET', cursor_key) or '0') or 0) % m
local seen, dropped, buckets = 0, 0, 0
while seen < budget and buckets < max_buckets and buckets < m do
  local key = P .. K_HISTORY .. bucket
  local flat = redis.call('HGETALL', key)
  local dead = {}
  for k = 1, #flat, 2 do
    local id = id_unpack(flat[k + 1])
    if redis.call('EXISTS', rec_key(id)) == 0 and not summary_get(id) then
      dead[#dead + 1] = flat[k]
    end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  dropped = dropped + #dead
  seen = seen + #flat / 2
  buckets = buckets + 1
  bucket = (bucket + 1) % m
end
h_dropped(dropped)
redis.call('SET', cursor_key, bucket)
return {buckets, dropped, m}
