-- KEYS: counters, ready list, delayed zset (of app and op), pause flag (of app), seq, batches, leases
-- ARGV: prefix, app, op, max_items, linger_ms, lease_ms[, nonce]
-- The batch id is 'b' .. a sequence number [.. '.' .. nonce]: the nonce keeps an id unique even
-- when a restart from the AOF (or a failover) forgot the last increments of the sequence.
-- Returns one of:
--   {'paused', ms_left, reason}       sending for the app is paused
--   {'empty', ms_to_next_due | -1}    nothing eligible
--   {'wait', ms}                      a partial batch whose oldest item has not lingered enough
--   {'batch', batch_id, items_json, eligible_left, head_wait_ms, eligible, oldest_ms}
-- where eligible is how many items were eligible at the claim (before it took any) and
-- oldest_ms how long the oldest item it took had been eligible: for a partial batch (fewer
-- than max_items eligible, all of them taken) the oldest eligible item. They let the flush
-- rule of SPEC 3.2 be checked claim by claim, and ride along in the reply at no extra cost.
local N, qk, dk, pause_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local seq_key, batches_key, leases_key = KEYS[5], KEYS[6], KEYS[7]
local app, op = ARGV[2], tonumber(ARGV[3])
local max_items, linger_ms, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local pause_ms = redis.call('PTTL', pause_key)
if pause_ms > 0 then
  return {'paused', pause_ms, redis.call('GET', pause_key) or ''}
end
local counts = {}

-- items whose retry backoff is over become eligible again, ahead of newer ones
local due = redis.call('ZRANGEBYSCORE', dk, '-inf', now, 'WITHSCORES', 'LIMIT', 0, 500)
for k = #due - 1, 1, -2 do
  local id = due[k]
  redis.call('ZREM', dk, id)
  local rec = load(id)
  if rec and rec.s == 'r' then
    rec.s = 'q'
    rec.u = tonumber(due[k + 1])
    save(id, rec)
    redis.call('LPUSH', qk, id)
    bump(counts, 'retrying', op, -1)
    bump(counts, 'queued', op, 1)
  end
end

local function head_wait(len)
  if len == 0 or len >= max_items then return 0 end
  local head = load(redis.call('LINDEX', qk, 0))
  if not head then return 0 end
  return math.max(0, (head.u or head.c) + linger_ms - now)
end

local len = redis.call('LLEN', qk)
if len == 0 then
  flush_counts(N, counts)
  local nxt = redis.call('ZRANGE', dk, 0, 0, 'WITHSCORES')
  if #nxt == 0 then return {'empty', -1} end
  return {'empty', math.max(0, tonumber(nxt[2]) - now)}
end
local wait = head_wait(len)
if wait > 0 then
  flush_counts(N, counts)
  return {'wait', wait}
end

-- LPOP first: under Redis's maxmemory only a script's first write may be refused (OOM), and
-- LPOP is never, so workers keep draining while producers get queue_full
local ids = redis.call('LPOP', qk, max_items)
local batch_id = 'b' .. redis.call('INCR', seq_key)
if ARGV[7] and ARGV[7] ~= '' then batch_id = batch_id .. '.' .. ARGV[7] end
local items, taken, seen, back = {}, {}, {}, {}
local oldest_ms = 0
for _, id in ipairs(ids) do
  local rec = load(id)
  if rec and rec.s == 'q' and not rec.d then
    -- a call never names a token (or an op-5 account) twice; per-key order makes this
    -- impossible, the check keeps it so whatever happens upstream
    local ident = rec.t or (rec.l[1][1] .. '\0' .. tostring(rec.l[1][2]))
    if seen[ident] then
      back[#back + 1] = id
    else
      seen[ident] = true
      oldest_ms = math.max(oldest_ms, now - (rec.u or rec.c))
      rec.s = 's'
      rec.n = (rec.n or 0) + 1
      rec.b = batch_id
      rec.u = now
      save(id, rec)
      bump(counts, 'queued', op, -1)
      bump(counts, 'sending', op, 1)
      taken[#taken + 1] = id
      items[#items + 1] = {id, rec.t or false, rec.l or {}, rec.n, rec.c}
    end
  end
end
for k = #back, 1, -1 do redis.call('LPUSH', qk, back[k]) end
flush_counts(N, counts)
if #taken == 0 then return {'empty', -1} end
redis.call('HSET', batches_key, batch_id, cjson.encode({a = app, o = op, i = taken}))
redis.call('ZADD', leases_key, now + lease_ms, batch_id)
local left = redis.call('LLEN', qk)
return {'batch', batch_id, cjson.encode(items), left, head_wait(left), len, oldest_ms}
