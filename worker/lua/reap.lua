-- KEYS: counters, leases, batches, timeline seconds, timeline minutes
-- ARGV: prefix, max_items, linger_ms, limit
-- Batches whose lease ran out (a worker died or hung mid-call) go back to their queues; their
-- attempt stays counted since the call may have been made. A check's lease (verification, SPEC
-- 6.1) hands its items back to their app's verifying set, due at once: they stay verifying, keys
-- held, and their deadline stands. The sweep runs it every second: it samples the queue depth
-- for the timeline after its changes. Returns {reclaimed_items, wakes}.
local N, leases_key, batches_key = KEYS[1], KEYS[2], KEYS[3]
local max_items, linger_ms, limit = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local counts, woken = {}, {}
local reclaimed = 0
for _, batch_id in ipairs(redis.call('ZRANGEBYSCORE', leases_key, '-inf', now, 'LIMIT', 0, limit)) do
  local raw = redis.call('HGET', batches_key, batch_id)
  redis.call('HDEL', batches_key, batch_id)
  redis.call('ZREM', leases_key, batch_id)
  redis.call('HINCRBY', N, 'leases_reclaimed', 1)
  if raw then
    local b = cjson.decode(raw)
    for k = #b.i, 1, -1 do
      local id = b.i[k]
      local rec = load(id)
      if rec and rec.s == 'v' and rec.vb == batch_id then
        rec.vb = nil
        save(id, rec)
        redis.call('ZADD', verify_key(rec.a), now, id)
        reclaimed = reclaimed + 1
      elseif rec and rec.s == 's' and rec.b == batch_id then
        rec.s = 'q'
        rec.u = now - linger_ms
        rec.er = 'lease_expired'
        save(id, rec)
        redis.call('LPUSH', ready_key(rec.a, rec.o), id)
        bump(counts, 'sending', rec.o, -1)
        bump(counts, 'queued', rec.o, 1)
        woken[rec.a .. ':' .. rec.o] = true
        reclaimed = reclaimed + 1
      end
    end
  end
end
flush_counts(N, counts)
-- the sample is a write: over maxmemory Redis refuses it, and reaping (which frees) must not fail
-- for a figure on a chart
pcall(tl_sample_depth, KEYS[4], KEYS[5], now, N)
return {reclaimed, wakes(woken, max_items, linger_ms)}
