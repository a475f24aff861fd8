-- ARGV: prefix, batch_id, status_ttl_s, max_items, linger_ms, outcomes_json, calls, items_sent
-- outcomes: [{i, s = ok|f|r|q, rc?, ret?, m?, er?, dl? (retry delay ms)}]
-- An outcome applies only while the intent is still 'sending' in this very batch: a worker whose
-- lease was reaped (and whose items went to another batch) cannot overwrite the newer outcome.
-- Returns {applied, stale, wakes}.
local batch_id, ttl = ARGV[2], tonumber(ARGV[3])
local max_items, linger_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local outcomes = cjson.decode(ARGV[6])
local now = now_ms()
local counts, woken = {}, {}
local applied, stale = 0, 0
redis.call('HDEL', P .. 'batches', batch_id)
redis.call('ZREM', P .. 'leases', batch_id)
redis.call('HINCRBY', P .. 'n', 'calls', tonumber(ARGV[7]))
redis.call('HINCRBY', P .. 'n', 'items_sent', tonumber(ARGV[8]))

local function opt(v)
  if v == nil or v == cjson.null then return nil end
  return v
end

for _, out in ipairs(outcomes) do
  local rec = load(out.i)
  if rec and rec.s == 's' and rec.b == batch_id then
    applied = applied + 1
    local op = rec.o
    bump(counts, 'sending', op, -1)
    rec.u = now
    rec.rc, rec.ret, rec.m, rec.er = opt(out.rc), opt(out.ret), opt(out.m), opt(out.er)
    if out.s == 'ok' or out.s == 'f' then
      rec.s = out.s
      release(out.i, rec, now, woken)
      save(out.i, rec, ttl)
      if out.s == 'ok' then
        bump(counts, 'succeeded', op, 1)
      else
        bump(counts, 'failed', op, 1)
        redis.call('ZADD', P .. 'failed', now, out.i)
      end
    elseif out.s == 'r' then
      rec.s = 'r'
      save(out.i, rec)
      redis.call('ZADD', delayed_key(rec.a, op), now + (tonumber(out.dl) or 0), out.i)
      bump(counts, 'retrying', op, 1)
    else
      -- back to the queue without spending an attempt (sending for the app is paused)
      rec.s = 'q'
      rec.n = math.max(0, (rec.n or 1) - 1)
      save(out.i, rec)
      redis.call('LPUSH', ready_key(rec.a, op), out.i)
      bump(counts, 'queued', op, 1)
      woken[rec.a .. ':' .. op] = true
    end
  else
    stale = stale + 1
  end
end
-- failed ids are kept as long as their records, for `requeue-failed` and the status page
redis.call('ZREMRANGEBYSCORE', P .. 'failed', '-inf', now - ttl * 1000)
flush_counts(counts)
return {applied, stale, wakes(woken, max_items, linger_ms)}
