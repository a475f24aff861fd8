-- KEYS: counters, metrics, batches, leases, failed, events, timeline seconds, timeline minutes
-- ARGV: prefix, batch_id, status_ttl_s, max_items, linger_ms, outcomes_json, query_calls,
--       events_maxlen, status_detail_s (summary.lua, keep_terminal)
-- outcomes: [{i, s, dl?, er?}] with s one of
--   ok  verified: succeeded, its keys released
--   v   not seen yet: checked again in dl ms (one more check counted for the backoff)
--   k   not checked (sending for the app is paused): again in dl ms, nothing counted
--   r   not seen by the deadline: sent again after dl ms (retrying; the attempt stays spent)
--   f   not seen by the deadline with the retry budget spent: failed, its keys released
-- An outcome applies only while the item is still verifying under this very check's lease: a
-- worker whose lease was reaped cannot overwrite what the next check decided.
-- Returns {applied, stale, wakes}.
local N, mk, batches_key, leases_key, failed_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local batch_id, ttl = ARGV[2], tonumber(ARGV[3])
local max_items, linger_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local outcomes = cjson.decode(ARGV[6])
local events_key, events_maxlen = KEYS[6], tonumber(ARGV[8])
local detail = tonumber(ARGV[9])
local now = now_ms()
local counts, woken = {}, {}
local tl, tl_minute = {ok = 0, f = 0}, {}
local applied, stale = 0, 0
redis.call('HDEL', batches_key, batch_id)
redis.call('ZREM', leases_key, batch_id)
redis.call('HINCRBY', N, 'query_calls', tonumber(ARGV[7]))

for _, out in ipairs(outcomes) do
  local rec = load(out.i)
  if rec and rec.s == 'v' and rec.vb == batch_id then
    applied = applied + 1
    local op = rec.o
    rec.vb = nil
    if out.s == 'v' or out.s == 'k' then
      if out.s == 'v' then rec.vk = (rec.vk or 0) + 1 end
      save(out.i, rec)
      redis.call('ZADD', verify_key(rec.a), now + (tonumber(out.dl) or 0), out.i)
    else
      bump(counts, 'verifying', op, -1)
      rec.u, rec.vt, rec.vk = now, nil, nil
      if out.s == 'ok' then
        rec.s, rec.vf = 'ok', true
        release(out.i, rec, now, woken)
        keep_terminal(out.i, rec, now, ttl, detail)
        emit(events_key, events_maxlen, out.i, rec, 'succeeded', now)
        tl.ok = tl.ok + 1
        bump(counts, 'succeeded', op, 1)
        bump(counts, 'done_succeeded', op, 1)
        redis.call('HINCRBY', N, 'verify_ok', 1)
      elseif out.s == 'r' then
        rec.s, rec.er = 'r', out.er
        save(out.i, rec)
        emit(events_key, events_maxlen, out.i, rec, 'retrying', now)
        redis.call('ZADD', delayed_key(rec.a, op), now + (tonumber(out.dl) or 0), out.i)
        bump(counts, 'retrying', op, 1)
        redis.call('HINCRBY', mk, 'retries:' .. op, 1)
        redis.call('HINCRBY', N, 'verify_retry', 1)
      else
        rec.s, rec.er = 'f', out.er
        release(out.i, rec, now, woken)
        save(out.i, rec, ttl)
        emit(events_key, events_maxlen, out.i, rec, 'failed', now)
        tl.f = tl.f + 1
        local reason = 'er:' .. (rec.er or 'unknown')
        tl_minute[reason] = (tl_minute[reason] or 0) + 1
        bump(counts, 'failed', op, 1)
        bump(counts, 'done_failed', op, 1)
        redis.call('ZADD', failed_key, now, out.i)
        redis.call('HINCRBY', N, 'verify_not_applied', 1)
      end
    end
  else
    stale = stale + 1
  end
end
summaries_done()
flush_counts(N, counts)
if tl.ok + tl.f > 0 then tl_add(KEYS[7], KEYS[8], now, tl, tl_minute) end
return {applied, stale, wakes(woken, max_items, linger_ms)}
