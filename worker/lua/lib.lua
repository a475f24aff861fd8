-- Shared by every script (prepended at load time, after the prelude that worker/keys.py
-- generates: P = ARGV[1], the key prefix, and the K_* key names, WAKE_FLAG_MS, LAT_BUCKETS,
-- STATE_NAME, PENDING_STATES, OPERATOR_TYPES). The keys a script knows up front come in KEYS.
-- Record of intent ID at P.."i:"..ID, a JSON string with short fields:
--   o op, a app, t token (ops 1-4), l [[account, type], ...], c created ms, u updated ms (absent = c),
--   s state (q sending v r ok f), n attempts, d predecessors still pending (absent = 0),
--   w ids waiting on this one, b batch id, rc/ret/m/er result code, ret_code, err_msg, error,
--   vf verified (absent: verification off), and while verifying (s = v, SPEC 6.1): vt the
--   deadline ms, vk checks made, vb the id of the check holding it under a lease.
-- P.."ko:<shard>" maps a 10-hex digest of each key (app + token, app + account + type) to the
-- latest pending intent holding it: per-key order is a chain of "waits for" edges along it.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function rec_key(id) return P .. K_RECORD .. id end
local function ready_key(app, op) return P .. K_READY .. app .. ':' .. op end
local function delayed_key(app, op) return P .. K_DELAYED .. app .. ':' .. op end
local function verify_key(app) return P .. K_VERIFYING .. app end

-- the app is left out of a record when it is 'default' (bytes per pending intent count)
local function load(id)
  local raw = redis.call('GET', rec_key(id))
  if not raw then return nil end
  local rec = cjson.decode(raw)
  rec.a = rec.a or 'default'
  return rec
end

local function save(id, rec, ttl_s)
  local app = rec.a
  if app == 'default' then rec.a = nil end
  local raw = cjson.encode(rec)
  rec.a = app
  if ttl_s then
    redis.call('SET', rec_key(id), raw, 'EX', ttl_s)
  else
    redis.call('SET', rec_key(id), raw)
  end
end

-- the key index is sharded into 4096 small hashes so that each stays a compact listpack:
-- shard = the digest's first 3 hex digits, field = the next 7 (a collision only makes two
-- unrelated intents wait for each other, which is safe)
local function ko_key(d) return P .. K_KEY_INDEX .. string.sub(d, 1, 3) end
local function ko_field(d) return string.sub(d, 4) end

-- the digests of an intent's keys: its token (ops 1-4) and each account with its type (ops 1-3, 5)
-- (kept per record table for the call: enqueue's chain and remember, complete's release and
-- summary, ask for the same record's; a record's app, op, token and accounts never change)
local DIGESTS = setmetatable({}, {__mode = 'k'})
local function digests(rec)
  local known = DIGESTS[rec]
  if known then return known end
  local out, seen = {}, {}
  local function add(s)
    local d = string.sub(redis.sha1hex(rec.a .. '\0' .. s), 1, 10)
    if not seen[d] then seen[d] = true; out[#out + 1] = d end
  end
  if rec.t then add('t\0' .. rec.t) end
  if rec.l and rec.o ~= 4 then
    for _, acc in ipairs(rec.l) do add('a\0' .. tostring(acc[2]) .. '\0' .. acc[1]) end
  end
  DIGESTS[rec] = out
  return out
end

-- counters are summed in a table and written once per script call
local function bump(counts, name, op, by)
  local f = name .. ':' .. op
  counts[f] = (counts[f] or 0) + by
end

-- into the counters hash N (each counting script's KEYS[1])
local function flush_counts(N, counts)
  for f, v in pairs(counts) do
    if v ~= 0 then redis.call('HINCRBY', N, f, v) end
  end
end

-- place ID behind the pending holders of its keys; true when it is eligible at once
local function chain(id, rec)
  local waits = 0
  local seen = {}
  for _, d in ipairs(digests(rec)) do
    local prev = redis.call('HGET', ko_key(d), ko_field(d))
    redis.call('HSET', ko_key(d), ko_field(d), id)
    if prev and prev ~= id and not seen[prev] then
      seen[prev] = true
      local prec = load(prev)
      if prec and prec.s ~= 'ok' and prec.s ~= 'f' then
        local w = prec.w or {}
        w[#w + 1] = id
        prec.w = w
        save(prev, prec)
        waits = waits + 1
      end
    end
  end
  if waits > 0 then rec.d = waits else rec.d = nil end
  return waits == 0
end

-- a terminal intent lets go of its keys and unblocks those that waited on it;
-- `woken` collects "app:op" of ready lists that grew
local function release(id, rec, now, woken)
  for _, d in ipairs(digests(rec)) do
    if redis.call('HGET', ko_key(d), ko_field(d)) == id then redis.call('HDEL', ko_key(d), ko_field(d)) end
  end
  if rec.w then
    for _, wid in ipairs(rec.w) do
      local wrec = load(wid)
      if wrec and wrec.d then
        wrec.d = wrec.d - 1
        if wrec.d <= 0 then
          wrec.d = nil
          wrec.u = now
          redis.call('RPUSH', ready_key(wrec.a, wrec.o), wid)
          woken[wrec.a .. ':' .. wrec.o] = true
        end
        save(wid, wrec)
      end
    end
    rec.w = nil
  end
end

-- should a wake-up be sent for this ready list? 'now' when a full batch waits, 'linger' once per
-- linger window otherwise, '' when a wake is already on its way
local function wake_kind(app, op, max_items, linger_ms)
  local n = redis.call('LLEN', ready_key(app, op))
  if n == 0 then return '' end
  if n >= max_items then
    if redis.call('SET', P .. K_WAKE .. app .. ':' .. op, '1', 'NX', 'PX', WAKE_FLAG_MS) then
      return 'now'
    end
    return ''
  end
  if redis.call('SET', P .. K_WAKE_LINGER .. app .. ':' .. op, '1', 'NX', 'PX', math.max(linger_ms, 1)) then
    return 'linger'
  end
  return ''
end

local function wakes(woken, max_items, linger_ms)
  local out = {}
  for k, _ in pairs(woken) do
    local app, op = string.match(k, '^(.*):(%d)$')
    local kind = wake_kind(app, tonumber(op), max_items, linger_ms)
    if kind ~= '' then out[#out + 1] = app .. ':' .. op .. ':' .. kind end
  end
  return out
end

-- History by key (SPEC §8): P.."h:<shard>" maps the digest of each key (as the key index above
-- does) to the latest intent that named it, whatever its state, and each record keeps in `hp` the
-- intent before it for each of its keys (aligned with digests(rec), '' for none; absent when it
-- has none). A key's history is a walk backwards from its head (history.lua): the links live and
-- expire with the records, and the head is dropped once its record is gone.
-- The index is read and written by lookup, never listed, so it is packed for memory: the field
-- is the digest's last 7 hex digits in 4 bytes, the value the id packed (id_pack).
-- hex digits (an even number, at most 24) as bytes, and back: by 4-byte words (struct), which
-- costs far less than a callback per byte
local function hex_bin(hex)
  local n = #hex
  if n <= 8 then return struct.pack('>I' .. (n / 2), tonumber(hex, 16)) end
  if n <= 16 then
    return struct.pack('>I4I' .. ((n - 8) / 2), tonumber(string.sub(hex, 1, 8), 16),
      tonumber(string.sub(hex, 9), 16))
  end
  return struct.pack('>I4I4I' .. ((n - 16) / 2), tonumber(string.sub(hex, 1, 8), 16),
    tonumber(string.sub(hex, 9, 16), 16), tonumber(string.sub(hex, 17), 16))
end

-- 10 bytes (a packed id) as 20 hex digits
local function bin_hex(bin)
  local a, b, c = struct.unpack('>I4I4I2', bin)
  return string.format('%08x%08x%04x', a, b, c)
end

-- an id as stored in the history index and in summaries: a generated id (20 lowercase hex
-- digits) in 10 bytes; any other id as it is, with a NUL after it if it has 10 characters, so
-- that the packing is one-to-one (ids never contain a NUL)
-- A generated id of a Redis Cluster store, '<app>.<20 hex>' (worker/keys.py, app_id), is packed
-- as '\2' .. app .. '\0' .. the 10 bytes (ids never contain either byte; 13 bytes or more).
local function id_pack(id)
  if #id == 20 and not string.find(id, '[^0-9a-f]') then
    return struct.pack('>I4I4I2', tonumber(string.sub(id, 1, 8), 16),
      tonumber(string.sub(id, 9, 16), 16), tonumber(string.sub(id, 17), 16))
  end
  if #id == 10 then return id .. '\0' end
  if #id > 21 and string.byte(id, #id - 20) == 46 then  -- '.' before 20 characters
    local app, hex = string.sub(id, 1, #id - 21), string.sub(id, #id - 19)
    if not string.find(hex, '[^0-9a-f]') and not string.find(app, '[^a-z0-9_-]') then
      return '\2' .. app .. '\0' .. hex_bin(hex)
    end
  end
  return id
end

local function id_unpack(s)
  if #s == 10 then return bin_hex(s) end
  if #s == 11 and string.byte(s, 11) == 0 then return string.sub(s, 1, 10) end
  if string.byte(s, 1) == 2 then
    return string.sub(s, 2, #s - 11) .. '.' .. bin_hex(string.sub(s, #s - 9))
  end
  return s
end

local function h_key(d) return P .. K_HISTORY .. string.sub(d, 1, 3) end
local function h_field(d) return hex_bin('0' .. string.sub(d, 4, 10)) end

local function remember(id, rec)
  local prev, any = {}, false
  local packed = id_pack(id)
  for k, d in ipairs(digests(rec)) do
    local key, field = h_key(d), h_field(d)
    local p = redis.call('HGET', key, field)
    redis.call('HSET', key, field, packed)
    if p then p = id_unpack(p) end
    if p and p ~= id then prev[k] = p; any = true else prev[k] = '' end
  end
  if any then rec.hp = prev else rec.hp = nil end
end

-- One entry in the events stream (SPEC §8) per change to retrying, verifying, succeeded or
-- failed, written by the script that makes the change, after the record: fields as
-- worker/events.py FIELDS, '' for null, `at` in epoch ms. Trimming is approximate (whole stream
-- nodes, cheap) for a large cap; a cap below a node's size is kept exactly, or it would never
-- trim at all.
local function emit(stream, maxlen, id, rec, state, now)
  local verified = ''
  if rec.vf == true then verified = '1' elseif rec.vf == false then verified = '0' end
  local how = '~'
  if maxlen < 10000 then how = '=' end
  redis.call('XADD', stream, 'MAXLEN', how, maxlen, '*', 'id', id, 'app', rec.a,
    'operator_type', rec.o, 'state', state, 'verified', verified, 'error', rec.er or '',
    'result_code', rec.rc or '', 'ret_code', rec.ret or '', 'attempts', rec.n or 0, 'at', now)
  redis.call('INCR', stream .. K_EVENTS_ADDED)
end

-- The timeline (worker/timeline.py): two rings of counters, fixed in size whatever the traffic.
-- P.."ts" holds the last TL_SECONDS seconds: field "<slot>" is the epoch second the slot holds
-- now, "<slot>:<series>" its counts (TL_SECOND_SERIES). P.."tm" holds the last TL_MINUTES
-- minutes the same way, with per-minute fields beside the series (call classes, latency
-- buckets, failure reasons). A slot found holding an older second (minute) is emptied before it
-- counts again: once a second (minute), by the first script that writes in it.
local function tl_slot_second(ts, sec)
  local k = tostring(sec % TL_SECONDS)
  if redis.call('HGET', ts, k) ~= tostring(sec) then
    local old = {}
    for _, s in ipairs(TL_SECOND_SERIES) do old[#old + 1] = k .. ':' .. s end
    redis.call('HDEL', ts, unpack(old))
    redis.call('HSET', ts, k, sec)
  end
  return k .. ':'
end

local function tl_slot_minute(tm, minute)
  local k = tostring(minute % TL_MINUTES)
  if redis.call('HGET', tm, k) ~= tostring(minute) then
    -- the minute's own fields are not a fixed list (reasons, classes): found by name, once a
    -- minute, among at most TL_MINUTES * a few dozen fields
    local pre, old = k .. ':', {}
    for _, f in ipairs(redis.call('HKEYS', tm)) do
      if string.sub(f, 1, #pre) == pre then old[#old + 1] = f end
    end
    for i = 1, #old, 500 do redis.call('HDEL', tm, unpack(old, i, math.min(i + 499, #old))) end
    redis.call('HSET', tm, k, minute)
  end
  return k .. ':'
end

-- `adds` (series -> n) count in both rings, `per_minute` (field -> n) in the minute ring only
local function tl_add(ts, tm, now, adds, per_minute)
  local sec = math.floor(now / 1000)
  local s, m = tl_slot_second(ts, sec), tl_slot_minute(tm, math.floor(sec / 60))
  for name, n in pairs(adds) do
    if n ~= 0 then
      redis.call('HINCRBY', ts, s .. name, n)
      redis.call('HINCRBY', tm, m .. name, n)
    end
  end
  for name, n in pairs(per_minute or {}) do
    if n ~= 0 then redis.call('HINCRBY', tm, m .. name, n) end
  end
end

-- the queue depth (queued + retrying + verifying, as `stats`, from the counters N) as the sample
-- of this second, and the minute's highest sample
local function tl_sample_depth(ts, tm, now, N)
  local fields = {}
  for _, op in ipairs(OPERATOR_TYPES) do
    fields[#fields + 1] = 'queued:' .. op
    fields[#fields + 1] = 'retrying:' .. op
    fields[#fields + 1] = 'verifying:' .. op
  end
  local depth = 0
  for _, v in ipairs(redis.call('HMGET', N, unpack(fields))) do
    if v then depth = depth + tonumber(v) end
  end
  local sec = math.floor(now / 1000)
  local s, m = tl_slot_second(ts, sec), tl_slot_minute(tm, math.floor(sec / 60))
  redis.call('HSET', ts, s .. 'd', depth)
  local top = tonumber(redis.call('HGET', tm, m .. 'd') or '-1')
  if depth > top then redis.call('HSET', tm, m .. 'd', depth) end
  return depth
end
