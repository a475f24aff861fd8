-- KEYS: the pruning cursor (the next history shard to look at)
-- ARGV: prefix, head budget, shard budget
-- Drops the history heads whose record is gone (lib.lua, remember), a few shards per call: from
-- the cursor on, whole shards, until `budget` heads or `shards` shards were looked at; then
-- moves the cursor on. Run by the sweep, so every head of an expired record goes within a pass
-- over the 4096 shards. Returns {shards looked at, heads dropped}.
local cursor_key, budget, max_shards = KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local shard = tonumber(redis.call('GET', cursor_key) or '0') or 0
local seen, dropped, shards = 0, 0, 0
while seen < budget and shards < max_shards do
  local key = P .. K_HISTORY .. string.format('%03x', shard)
  local flat = redis.call('HGETALL', key)
  for k = 1, #flat, 2 do
    local id = id_unpack(flat[k + 1])
    if redis.call('EXISTS', rec_key(id)) == 0 and not summary_get(id) then
      redis.call('HDEL', key, flat[k])
      dropped = dropped + 1
    end
  end
  seen = seen + #flat / 2
  shards = shards + 1
  shard = (shard + 1) % 4096
end
redis.call('SET', cursor_key, shard)
return {shards, dropped}
