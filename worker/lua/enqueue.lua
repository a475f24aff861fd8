-- KEYS: counters, timeline seconds, timeline minutes[, the app's move flag (cluster mode: one
--       app a call)]
-- ARGV: prefix, max_items, linger_ms, max_pending (0 = none), then one JSON intent per argument:
-- {i, a, o, t?, l?, x?} (x: the id is also looked up among the summaries of succeeded intents,
-- summary.lua: an id the caller gave, or any id of a call re-sent after its reply was lost, whose
-- first run may have stored an intent that has since succeeded and been compacted; a generated id
-- is otherwise new by construction)
-- Returns {codes, wakes}: codes[k] is 1 (stored), 0 (same id and payload already stored), -1 (same
-- id, other payload) or -2 (refused: queue_full, nothing written); wakes lists "app:op:now|linger".
-- Idempotent by id: a call run twice (a client re-sending after a lost reply) stores each intent
-- once, and the second run answers 0 for it, so ids are assigned by the client, never here.
-- Nothing is written before the first new intent is known to fit: under Redis's maxmemory the
-- first write of a script is refused with OOM, and then nothing at all was written.
local N = KEYS[1]
-- the app's slot is moving to another master (worker/clustermove.py): write nothing, answer -3
-- (not written, safe to send again); a declared key, so that once the flag has moved the
-- cluster sends this call to the new master, which holds every key of the app by then
if KEYS[4] and redis.call('EXISTS', KEYS[4]) == 1 then
  local refused = {}
  for k = 5, #ARGV do refused[#refused + 1] = -3 end
  return {refused, {}}
end
local max_items, linger_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_pending = tonumber(ARGV[4])
local now = now_ms()
local codes, counts, woken = {}, {}, {}
local stored = 0

-- back-pressure: the pending intents, from the counters the store keeps anyway
local pending = 0
if max_pending > 0 then
  local fields = {}
  for _, state in ipairs(PENDING_STATES) do
    for _, op in ipairs(OPERATOR_TYPES) do fields[#fields + 1] = state .. ':' .. op end
  end
  for _, v in ipairs(redis.call('HMGET', N, unpack(fields))) do
    if v then pending = pending + tonumber(v) end
  end
end

local function same_accounts(x, y)
  x, y = x or {}, y or {}
  if #x ~= #y then return false end
  for k = 1, #x do
    if x[k][1] ~= y[k][1] or tonumber(x[k][2]) ~= tonumber(y[k][2]) then return false end
  end
  return true
end

for k = 5, #ARGV do
  local it = cjson.decode(ARGV[k])
  local old = load(it.i)
  local summary = nil
  if not old and it.x then summary = summary_get(it.i) end
  if old then
    if old.o == it.o and old.a == it.a and old.t == it.t and same_accounts(old.l, it.l) then
      codes[#codes + 1] = 0
    else
      codes[#codes + 1] = -1
    end
  elseif summary then
    if summary_rec(summary).pd == payload_digest(it.a, it.o, it.t, it.l) then
      codes[#codes + 1] = 0
    else
      codes[#codes + 1] = -1
    end
  elseif max_pending > 0 and pending >= max_pending then
    codes[#codes + 1] = -2
  else
    pending = pending + 1
    local rec = {o = it.o, a = it.a, t = it.t, l = it.l, c = now, s = 'q'}
    remember(it.i, rec)
    if chain(it.i, rec) then
      redis.call('RPUSH', ready_key(it.a, it.o), it.i)
      woken[it.a .. ':' .. it.o] = true
    end
    save(it.i, rec)
    bump(counts, 'queued', it.o, 1)
    bump(counts, 'enqueued', it.o, 1)
    codes[#codes + 1] = 1
    stored = stored + 1
  end
end
flush_counts(N, counts)
if stored > 0 then tl_add(KEYS[2], KEYS[3], now, {['in'] = stored}) end
return {codes, wakes(woken, max_items, linger_ms)}
