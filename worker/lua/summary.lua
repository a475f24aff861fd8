-- Compact terminal records (SPEC §5, TPNS_STATUS_DETAIL_S), shared by every script after lib.lua.
-- A succeeded intent keeps its full record for the detail period and a summary for the whole
-- status TTL; a failed one keeps its full record (requeue-failed needs its payload). Summaries
-- live in families of small hashes, one family per time span (SUMMARY_SPANS_PER_TTL per TTL):
--   P.."cm"               "<start>" -> the family's buckets, "<start>:n" -> its summaries,
--                         "<start>:x" -> when its buckets expire (epoch s)
--   P.."c:<start>:<k>"    bucket k: id_pack(id) -> cmsgpack array
--                         {created ms, updated - created, code, attempts, batch id, payload
--                          digest, links, app, rc, ret, err_msg, error}, trailing nulls left out
--   P.."c:<start>:o"      the family's overflow: the summaries longer than SUMMARY_MAX_BYTES
--                         (a stub, cmsgpack 0, in their bucket) and those of ids longer than it
-- code = op * 16 + verified * 4 + state (verified: 0 null, 1 false, 2 true; state 1 ok, 2 f);
-- batch id = {seq, nonce (4 bytes)[, the rest: ".app" in cluster mode]} for claim.lua's ids;
-- err_msg = its number in SUMMARY_ERR_MSGS when it is one of those;
-- links (history walks, history.lua) = the predecessor (packed) when every key of the intent had
-- that one, else {digest bytes 1-4 of a key, its predecessor (packed), ...} for the keys that had
-- one; the payload digest (6 bytes of SHA-1 over app, op, token and accounts) refuses an explicit
-- id enqueued again with another payload (enqueue.lua).
-- Every field and value of a bucket is at most SUMMARY_MAX_BYTES (Redis's hash-max-listpack-value:
-- one longer entry turns the whole bucket into a hashtable): the encoding above keeps the
-- summaries of a key bound again and again, with TPNS's answers, below it, and the rest overflow.
-- Each family is a linear hash table: it starts with one bucket and splits the next one in turn
-- whenever it holds more than SUMMARY_LOAD summaries a bucket, so every bucket stays a small
-- listpack whatever the traffic, a lookup reads one bucket per family, and all of a family's
-- buckets expire together (one TTL per bucket, none per summary).

local function hash32(packed) return tonumber(string.sub(redis.sha1hex(packed), 1, 8), 16) end

-- the bucket of hash h in a family of m buckets (2^L <= m < 2^(L+1); the first m - 2^L split)
local function bucket_of(h, m)
  local lo = 1
  while lo * 2 <= m do lo = lo * 2 end
  local a = h % (lo * 2)
  if a >= m then a = a - lo end
  return a
end

local function bucket_key(start, k) return P .. K_SUMMARY .. start .. ':' .. k end
local function overflow_key(start) return P .. K_SUMMARY .. start .. ':o' end
-- in a bucket, in place of a summary too long for a listpack entry, which is in the overflow hash
local SUMMARY_STUB = cmsgpack.pack(0)
-- TPNS's err_msg of a call whose items were judged one by one (ret_code 0, 1008026, 1008027,
-- which every item of the call shares), kept as their number here
local SUMMARY_ERR_MSGS = {'NO_ERROR', 'batch op, partly error', 'batch op, total error'}

local function payload_digest(app, op, token, accounts)
  local parts = {app, tostring(op), token or ''}
  for _, acc in ipairs(accounts or {}) do
    parts[#parts + 1] = acc[1] .. '\1' .. tostring(tonumber(acc[2]))
  end
  return hex_bin(string.sub(redis.sha1hex(table.concat(parts, '\0')), 1, 12))
end

local function nullable(v)
  if v == nil or v == cjson.null then return false end
  return v
end

-- the links of a record: false for none; its predecessor (packed) alone when every key of the
-- record has that one (the same pair bound again, a one-key intent); else {digest bytes 1-4 of a
-- key, its predecessor (packed), ...} for the keys that had one
local function links_of(rec)
  if not rec.hp then return false end
  local links, same, all_same = {}, nil, true
  for k, d in ipairs(digests(rec)) do
    local p = rec.hp[k]
    if p and p ~= '' then
      links[#links + 1] = hex_bin(string.sub(d, 1, 8))
      links[#links + 1] = id_pack(p)
      if same == nil then same = p elseif same ~= p then all_same = false end
    else
      all_same = false
    end
  end
  if #links == 0 then return false end
  if all_same then return id_pack(same) end
  return links
end

-- a batch id as claim.lua makes it, 'b<seq>.<8 hex>[<rest>]', as {seq, 4 bytes[, rest]};
-- any other as it is
local BATCH_PATTERN = '^b([1-9]%d*)%.(' .. string.rep('[0-9a-f]', 8) .. ')(.*)$'
-- (the items of one call share their batch id: the last one packed is kept)
local BATCH_LAST, BATCH_LAST_PACKED = nil, nil
local function batch_pack(b)
  if b == nil or b == cjson.null then return false end
  if b == BATCH_LAST then return BATCH_LAST_PACKED end
  local seq, nonce, rest = string.match(b, BATCH_PATTERN)
  local out = b
  if seq and #seq <= 15 then
    out = {tonumber(seq), hex_bin(nonce)}
    if rest ~= '' then out[3] = rest end
  end
  BATCH_LAST, BATCH_LAST_PACKED = b, out
  return out
end

local function batch_unpack(v)
  if type(v) ~= 'table' then return v end
  local nonce = struct.unpack('>I4', v[2])
  return 'b' .. string.format('%d', v[1]) .. '.' .. string.format('%08x', nonce) .. (v[3] or '')
end

local function summary_of(rec)
  local vf = 0
  if rec.vf == false then vf = 1 elseif rec.vf == true then vf = 2 end
  local state = 2
  if rec.s == 'ok' then state = 1 end
  local app = false
  if rec.a ~= 'default' then app = rec.a end
  local m = nullable(rec.m)
  if type(m) == 'number' then m = tostring(m) end  -- a number read back means SUMMARY_ERR_MSGS
  for k, known in ipairs(SUMMARY_ERR_MSGS) do
    if m == known then m = k end
  end
  local c = rec.c
  local v = {c, (rec.u or c) - c, rec.o * 16 + vf * 4 + state, rec.n or 0, batch_pack(rec.b),
             payload_digest(rec.a, rec.o, rec.t, rec.l), links_of(rec), app,
             nullable(rec.rc), nullable(rec.ret), m, nullable(rec.er)}
  while #v > 0 and v[#v] == false do v[#v] = nil end
  return cmsgpack.pack(v)
end

-- a summary as a record (lib.lua's fields, `x` set: compacted; `pd` and `lk` are bytes, left out
-- of what goes back to the client)
local function summary_rec(raw)
  local v = cmsgpack.unpack(raw)
  local code = v[3]
  local rec = {c = v[1], u = v[1] + v[2], o = math.floor(code / 16), n = v[4], x = 1,
               s = 'f', a = v[8] or 'default', pd = v[6], lk = v[7] or nil}
  if code % 4 == 1 then rec.s = 'ok' end
  local vf = math.floor(code / 4) % 4
  if vf == 1 then rec.vf = false elseif vf == 2 then rec.vf = true end
  if v[5] then rec.b = batch_unpack(v[5]) end
  if v[9] ~= nil and v[9] ~= false then rec.rc = v[9] end
  if v[10] ~= nil and v[10] ~= false then rec.ret = v[10] end
  if type(v[11]) == 'number' then rec.m = SUMMARY_ERR_MSGS[v[11]] elseif v[11] then rec.m = v[11] end
  if v[12] then rec.er = v[12] end
  return rec
end

-- the record as the client reads it
local function summary_json(rec)
  local pd, lk = rec.pd, rec.lk
  rec.pd, rec.lk = nil, nil
  local out = cjson.encode(rec)
  rec.pd, rec.lk = pd, lk
  return out
end

-- the families whose buckets live, newest first: {{start, buckets}, ...} (read once a call)
local SUMMARY_FAMILIES = nil
local function families()
  if SUMMARY_FAMILIES then return SUMMARY_FAMILIES end
  local flat = redis.call('HGETALL', P .. K_SUMMARY_META)
  local now_s = math.floor(now_ms() / 1000)
  local m, x = {}, {}
  for k = 1, #flat, 2 do
    local start, suffix = string.match(flat[k], '^(%d+):?(%a?)$')
    if start and suffix == '' then m[start] = tonumber(flat[k + 1]) end
    if start and suffix == 'x' then x[start] = tonumber(flat[k + 1]) end
  end
  local out = {}
  for start, buckets in pairs(m) do
    if (x[start] or 0) > now_s then out[#out + 1] = {start, buckets} end
  end
  table.sort(out, function(p, q) return tonumber(p[1]) > tonumber(q[1]) end)
  SUMMARY_FAMILIES = out
  return out
end

-- the summary of ID (raw), or nil
local function summary_get(id)
  local f = id_pack(id)
  local h = hash32(f)
  for _, fam in ipairs(families()) do
    local raw
    if #f > SUMMARY_MAX_BYTES then
      raw = redis.call('HGET', overflow_key(fam[1]), f)
    else
      raw = redis.call('HGET', bucket_key(fam[1], bucket_of(h, fam[2])), f)
      if raw == SUMMARY_STUB then raw = redis.call('HGET', overflow_key(fam[1]), f) end
    end
    if raw then return raw end
  end
  return nil
end

-- the link of a compacted record for the key of digest d, or nil (history.lua)
local function summary_link(rec, d)
  if not rec.lk then return nil end
  if type(rec.lk) == 'string' then return id_unpack(rec.lk) end
  local want = hex_bin(string.sub(d, 1, 8))
  for k = 1, #rec.lk, 2 do
    if rec.lk[k] == want then return id_unpack(rec.lk[k + 1]) end
  end
  return nil
end

-- the family summaries are written to in this call: {start, m, n, x}, opened on first use
local SUMMARY_CUR, SUMMARY_ADDED, SUMMARY_TOUCHED = nil, 0, {}

local function family_open(now, ttl_s)
  local span = math.max(SUMMARY_SPAN_MIN_S,
    math.min(SUMMARY_SPAN_MAX_S, math.floor(ttl_s / SUMMARY_SPANS_PER_TTL)))
  local now_s = math.floor(now / 1000)
  local start = tostring(now_s - now_s % span)
  local meta = P .. K_SUMMARY_META
  local got = redis.call('HMGET', meta, start, start .. ':n', start .. ':x')
  if not got[1] then
    -- a new family: forget the ones whose buckets have expired (a few fields each)
    local flat, old = redis.call('HGETALL', meta), {}
    for k = 1, #flat, 2 do
      local s, suffix = string.match(flat[k], '^(%d+):?(%a?)$')
      if s and suffix == 'x' and tonumber(flat[k + 1]) <= now_s then
        old[#old + 1] = s; old[#old + 1] = s .. ':n'; old[#old + 1] = s .. ':x'
      end
    end
    if #old > 0 then redis.call('HDEL', meta, unpack(old)) end
    got = {1, 0, tonumber(start) + span + ttl_s}
    redis.call('HSET', meta, start, got[1], start .. ':n', got[2], start .. ':x', got[3])
    SUMMARY_FAMILIES = nil
  end
  SUMMARY_CUR = {start = start, m = tonumber(got[1]), n = tonumber(got[2]), x = tonumber(got[3])}
end

-- move the summaries of the next bucket in turn that belong to the new one (linear hashing)
local function family_split(fam)
  local lo = 1
  while lo * 2 <= fam.m do lo = lo * 2 end
  local from, to = bucket_key(fam.start, fam.m - lo), bucket_key(fam.start, fam.m)
  local flat, moved = redis.call('HGETALL', from), {}
  for k = 1, #flat, 2 do
    if hash32(flat[k]) % (lo * 2) == fam.m then
      redis.call('HSET', to, flat[k], flat[k + 1])
      moved[#moved + 1] = flat[k]
    end
  end
  if #moved > 0 then
    redis.call('HDEL', from, unpack(moved))
    redis.call('EXPIREAT', to, fam.x)
  end
  fam.m = fam.m + 1
end

local function summary_put(id, rec, now, ttl_s)
  if not SUMMARY_CUR then family_open(now, ttl_s) end
  local fam = SUMMARY_CUR
  local f = id_pack(id)
  local packed = summary_of(rec)
  local key = bucket_key(fam.start, bucket_of(hash32(f), fam.m))
  -- too long for a listpack entry: kept whole in the family's overflow hash, with a stub in the
  -- bucket (which stays a listpack); an id too long for a field is in the overflow hash alone
  if #f > SUMMARY_MAX_BYTES then
    key = overflow_key(fam.start)
  elseif #packed > SUMMARY_MAX_BYTES then
    local over = overflow_key(fam.start)
    redis.call('HSET', over, f, packed)
    SUMMARY_TOUCHED[over] = true
    packed = SUMMARY_STUB
  end
  if redis.call('HSET', key, f, packed) == 1 then
    fam.n = fam.n + 1
    SUMMARY_ADDED = SUMMARY_ADDED + 1
  end
  SUMMARY_TOUCHED[key] = true
end

-- after the last summary_put of a call: the buckets' TTL, the count, the splits it calls for
local function summaries_done()
  local fam = SUMMARY_CUR
  if not fam then return end
  for key, _ in pairs(SUMMARY_TOUCHED) do redis.call('EXPIREAT', key, fam.x) end
  local m0 = fam.m
  while fam.n > SUMMARY_LOAD * fam.m do family_split(fam) end
  local meta = P .. K_SUMMARY_META
  if SUMMARY_ADDED > 0 then redis.call('HINCRBY', meta, fam.start .. ':n', SUMMARY_ADDED) end
  if fam.m ~= m0 then redis.call('HSET', meta, fam.start, fam.m) end
  SUMMARY_CUR, SUMMARY_ADDED, SUMMARY_TOUCHED, SUMMARY_FAMILIES = nil, 0, {}, nil
end

-- a terminal record, kept as SPEC §5 says: a failed one whole for the status TTL; a succeeded
-- one whole for the detail period (none when it is 0) and as a summary for the whole TTL; whole
-- for the TTL when the detail period is not shorter than the TTL (no summaries)
local function keep_terminal(id, rec, now, ttl_s, detail_s)
  if rec.s ~= 'ok' or detail_s == nil or detail_s >= ttl_s then
    save(id, rec, ttl_s)
    return
  end
  summary_put(id, rec, now, ttl_s)
  if detail_s > 0 then save(id, rec, detail_s) else redis.call('DEL', rec_key(id)) end
end
