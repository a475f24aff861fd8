-- ARGV: prefix, max_items, linger_ms, then one JSON intent per argument: {i, a, o, t?, l?}
-- Returns {codes, wakes}: codes[k] is 1 (stored), 0 (same id and payload already stored) or
-- -1 (same id, other payload); wakes lists "app:op:now|linger".
local max_items, linger_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local codes, counts, woken = {}, {}, {}

local function same_accounts(x, y)
  x, y = x or {}, y or {}
  if #x ~= #y then return false end
  for k = 1, #x do
    if x[k][1] ~= y[k][1] or tonumber(x[k][2]) ~= tonumber(y[k][2]) then return false end
  end
  return true
end

for k = 4, #ARGV do
  local it = cjson.decode(ARGV[k])
  local old = load(it.i)
  if old then
    if old.o == it.o and old.a == it.a and old.t == it.t and same_accounts(old.l, it.l) then
      codes[#codes + 1] = 0
    else
      codes[#codes + 1] = -1
    end
  else
    local rec = {o = it.o, a = it.a, t = it.t, l = it.l, c = now, s = 'q'}
    if chain(it.i, rec) then
      redis.call('RPUSH', ready_key(it.a, it.o), it.i)
      woken[it.a .. ':' .. it.o] = true
    end
    save(it.i, rec)
    bump(counts, 'queued', it.o, 1)
    bump(counts, 'enqueued', it.o, 1)
    codes[#codes + 1] = 1
  end
end
flush_counts(counts)
return {codes, wakes(woken, max_items, linger_ms)}
