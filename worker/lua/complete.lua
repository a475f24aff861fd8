-- KEYS: counters, metrics, batches, leases, failed, events, timeline seconds, timeline minutes
-- ARGV: prefix, batch_id, status_ttl_s, max_items, linger_ms, outcomes_json, calls, items_sent,
--       metrics_json, events_maxlen, status_detail_s[, verify_delay_ms, verify_timeout_ms]
-- A succeeded item keeps its record whole for status_detail_s and a summary for the status TTL
-- (summary.lua, keep_terminal); a failed one keeps its record whole for the TTL.
-- With the verify pair (TPNS_VERIFY=on, SPEC 6.1) an accepted item ('ok') is 'verifying' instead
-- of succeeded: it keeps its keys, its first check is due after the delay, and its deadline is
-- the timeout from now; the reply's wakes then include one verify wake per app ("app:0:verify").
-- outcomes: [{i, s = ok|f|r|q, rc?, ret?, m?, er?, dl? (retry delay ms)}]
-- metrics: {op, bs = batch size, c = [[call result class, latency ms or -1], ...]} -> hash P.."m"
--   (cluster-wide figures for /metrics: calls by op and class, latency and batch-size buckets)
-- An outcome applies only while the intent is still 'sending' in this very batch: a worker whose
-- lease was reaped (and whose items went to another batch) cannot overwrite the newer outcome.
-- Returns {applied, stale, wakes}.
local N, mk, batches_key, leases_key, failed_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local batch_id, ttl = ARGV[2], tonumber(ARGV[3])
local max_items, linger_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
local outcomes = cjson.decode(ARGV[6])
local events_key, events_maxlen = KEYS[6], tonumber(ARGV[10])
local detail = tonumber(ARGV[11])
local verify_delay, verify_timeout = tonumber(ARGV[12] or ''), tonumber(ARGV[13] or '')
local to_verify = {}
local now = now_ms()
local counts, woken = {}, {}
local applied, stale = 0, 0
redis.call('HDEL', batches_key, batch_id)
redis.call('ZREM', leases_key, batch_id)
redis.call('HINCRBY', N, 'calls', tonumber(ARGV[7]))
redis.call('HINCRBY', N, 'items_sent', tonumber(ARGV[8]))
local metrics = cjson.decode(ARGV[9])
redis.call('HINCRBY', mk, 'bs:' .. metrics.bs, 1)
-- the timeline's counts of this call: summed here, written once (tl_add) at the end
local tl, tl_minute = {c = tonumber(ARGV[7]), ok = 0, f = 0}, {}
local function tl_bump(f) tl_minute[f] = (tl_minute[f] or 0) + 1 end
for _, call in ipairs(metrics.c) do
  redis.call('HINCRBY', mk, 'call:' .. metrics.op .. ':' .. call[1], 1)
  tl_bump('cc:' .. call[1])
  local ms = tonumber(call[2])
  if ms >= 0 then
    local le = '+Inf'
    for _, b in ipairs(LAT_BUCKETS) do
      if ms <= b then le = tostring(b); break end
    end
    redis.call('HINCRBY', mk, 'lat:' .. le, 1)
    tl_bump('lat:' .. le)
    redis.call('HINCRBYFLOAT', mk, 'lat_sum_ms', ms)
  end
end

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
    if out.s == 'ok' and verify_delay then
      rec.s, rec.vf, rec.vt, rec.vk = 'v', false, now + verify_timeout, 0
      save(out.i, rec)
      emit(events_key, events_maxlen, out.i, rec, 'verifying', now)
      redis.call('ZADD', verify_key(rec.a), now + verify_delay, out.i)
      bump(counts, 'verifying', op, 1)
      to_verify[rec.a] = true
    elseif out.s == 'ok' or out.s == 'f' then
      rec.s = out.s
      release(out.i, rec, now, woken)
      keep_terminal(out.i, rec, now, ttl, detail)
      emit(events_key, events_maxlen, out.i, rec, out.s == 'ok' and 'succeeded' or 'failed', now)
      -- 'done_*' only ever grow (requeue-failed lowers 'failed'): they feed the _total metrics
      if out.s == 'ok' then
        tl.ok = tl.ok + 1
        bump(counts, 'succeeded', op, 1)
        bump(counts, 'done_succeeded', op, 1)
      else
        tl.f = tl.f + 1
        tl_bump('er:' .. (rec.er or 'unknown'))
        bump(counts, 'failed', op, 1)
        bump(counts, 'done_failed', op, 1)
        redis.call('ZADD', failed_key, now, out.i)
      end
    elseif out.s == 'r' then
      redis.call('HINCRBY', mk, 'retries:' .. op, 1)
      rec.s = 'r'
      save(out.i, rec)
      emit(events_key, events_maxlen, out.i, rec, 'retrying', now)
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
redis.call('ZREMRANGEBYSCORE', failed_key, '-inf', now - ttl * 1000)
summaries_done()
flush_counts(N, counts)
tl_add(KEYS[7], KEYS[8], now, tl, tl_minute)
local out_wakes = wakes(woken, max_items, linger_ms)
for app, _ in pairs(to_verify) do
  -- one delayed verify wake per app and delay window; the sweep catches the rest
  if redis.call('SET', P .. K_WAKE_VERIFY .. app, '1', 'NX', 'PX', math.max(verify_delay, 1)) then
    out_wakes[#out_wakes + 1] = app .. ':0:verify'
  end
end
return {applied, stale, out_wakes}
