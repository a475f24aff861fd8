-- KEYS: counters, verifying (P v:{app}), pause:{app}, seq, batches, leases
-- ARGV: prefix, app, limit, lease_ms[, nonce]
-- Takes up to `limit` verifying items of the app whose next check is due, under a lease: a check
-- is a batch of query calls, and the reaper hands its items back if the worker dies mid-check.
-- Returns one of:
--   {'paused', ms_left, reason}
--   {'empty', ms_to_next_check | -1}
--   {'batch', batch_id, items_json, due_left, ms_to_next_check | -1}
-- items: [[id, op, token | false, [[account, type], ...], attempts, created_ms, deadline_ms, checks]]
local N, vkey, pause_key, seq_key, batches_key, leases_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local app, limit, lease_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
local pause_ms = redis.call('PTTL', pause_key)
if pause_ms > 0 then
  return {'paused', pause_ms, redis.call('GET', pause_key) or ''}
end
local due = redis.call('ZRANGEBYSCORE', vkey, '-inf', now, 'LIMIT', 0, limit)
if #due == 0 then
  local nxt = redis.call('ZRANGE', vkey, 0, 0, 'WITHSCORES')
  if #nxt == 0 then return {'empty', -1} end
  return {'empty', math.max(0, tonumber(nxt[2]) - now)}
end
redis.call('ZREM', vkey, unpack(due))
local batch_id = 'v' .. redis.call('INCR', seq_key)
if ARGV[5] and ARGV[5] ~= '' then batch_id = batch_id .. '.' .. ARGV[5] end
local items, taken = {}, {}
for _, id in ipairs(due) do
  local rec = load(id)
  if rec and rec.s == 'v' then
    rec.vb = batch_id
    save(id, rec)
    taken[#taken + 1] = id
    items[#items + 1] = {id, rec.o, rec.t or false, rec.l or {}, rec.n or 1, rec.c,
                         rec.vt or now, rec.vk or 0}
  end
end
if #taken == 0 then return {'empty', 0} end
redis.call('HSET', batches_key, batch_id, cjson.encode({a = app, v = 1, i = taken}))
redis.call('ZADD', leases_key, now + lease_ms, batch_id)
local left = redis.call('ZCOUNT', vkey, '-inf', now)
local nxt = redis.call('ZRANGE', vkey, 0, 0, 'WITHSCORES')
local next_ms = -1
if #nxt > 0 then next_ms = math.max(0, tonumber(nxt[2]) - now) end
return {'batch', batch_id, cjson.encode(items), left, next_ms}
