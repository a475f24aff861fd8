-- KEYS: the history shard of the key (P.."h:" .. first 3 hex digits of its digest)
-- ARGV: prefix, (unused), digest, app, kind ('t' token | 'a' account), value, account_type, limit
-- Walks the key's history from its head backwards (lib.lua, remember) and returns
-- {id1, record1, id2, record2, ...}, newest first, at most `limit` intents that named the key
-- (a digest shared with another key only adds records that are skipped here). A head whose
-- record is gone is dropped: the records behind it are older, so gone too. A compacted intent
-- (summary.lua) no longer holds its keys: it is taken as naming the key its digest led to, and
-- followed by the links it kept.
local shard, d = KEYS[1], ARGV[3]
local field = h_field(d)
local app, kind, value, atype, limit = ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8])

local function named(rec)
  if rec.a ~= app then return false end
  if rec.x then return true end
  if kind == 't' then return rec.t == value end
  if rec.o == 4 then return false end
  for _, acc in ipairs(rec.l or {}) do
    if acc[1] == value and tostring(acc[2]) == atype then return true end
  end
  return false
end

local function link(rec)
  if rec.x then return summary_link(rec, d) end
  if not rec.hp then return nil end
  for k, dk in ipairs(digests(rec)) do
    if dk == d then
      local prev = rec.hp[k]
      if prev and prev ~= '' then return prev end
      return nil
    end
  end
  return nil
end

local out = {}
local head = redis.call('HGET', shard, field)
if head then head = id_unpack(head) end
local id, steps = head, 0
-- the step bound only matters if digests collide (other keys' intents along the walk)
while id and #out < 2 * limit and steps < 2 * limit + 20 do
  steps = steps + 1
  local raw = redis.call('GET', rec_key(id))
  local rec
  if raw then
    rec = cjson.decode(raw)
    rec.a = rec.a or 'default'
  else
    local packed = summary_get(id)
    if not packed then
      if id == head then redis.call('HDEL', shard, field) end
      break
    end
    rec = summary_rec(packed)
    raw = summary_json(rec)
  end
  if named(rec) then
    out[#out + 1] = id
    out[#out + 1] = raw
  end
  id = link(rec)
end
return out
