-- KEYS: counters, failed
-- ARGV: prefix, error_filter ('' = all), limit, max_items, linger_ms
-- Failed intents go back to the queue as if newly enqueued (behind the pending holders of their
-- keys), with a fresh retry budget. Returns {ids, wakes}.
local N, failed_key = KEYS[1], KEYS[2]
local filter, limit = ARGV[2], tonumber(ARGV[3])
local max_items, linger_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = now_ms()
local counts, woken, moved = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGE', failed_key, 0, -1)) do
  if #moved >= limit then break end
  local rec = load(id)
  if not rec or rec.s ~= 'f' then
    redis.call('ZREM', failed_key, id)
  elseif filter == '' or rec.er == filter then
    redis.call('ZREM', failed_key, id)
    rec.s = 'q'
    rec.n = 0
    rec.c = now
    rec.u = now
    rec.rc, rec.ret, rec.m, rec.er, rec.b = nil, nil, nil, nil, nil
    if chain(id, rec) then
      redis.call('RPUSH', ready_key(rec.a, rec.o), id)
      woken[rec.a .. ':' .. rec.o] = true
    end
    save(id, rec)
    bump(counts, 'failed', rec.o, -1)
    bump(counts, 'queued', rec.o, 1)
    moved[#moved + 1] = id
  end
end
flush_counts(N, counts)
return {moved, wakes(woken, max_items, linger_ms)}
