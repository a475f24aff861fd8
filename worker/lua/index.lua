-- Linear hashing (shared by the history index below and the summaries, summary.lua): a table of
-- m buckets, 2^L <= m < 2^(L+1), grows one bucket at a time by splitting bucket m - 2^L, so that
-- every bucket stays a small listpack whatever the number of entries, and a lookup reads one.
-- The bucket of hash h (the first m - 2^L buckets have split already):
local function bucket_of(h, m)
  local lo = 1
  while lo * 2 <= m do lo = lo * 2 end
  local a = h % (lo * 2)
  if a >= m then a = a - lo end
  return a
end

-- History by key (SPEC §8): P.."hb:<k>" maps the digest of each key (as the key index in lib.lua
-- computes it) to the latest intent that named it, whatever its state, and each record keeps in
-- `hp` the intent before it for each of its keys (aligned with digests(rec), '' for none; absent
-- when it has none). A key's history is a walk backwards from its head (history.lua): the links
-- live and expire with the records (and summaries), and a head is dropped once both are gone.
-- The index is read and written by lookup, never listed, so it is packed for memory: the field
-- is the digest's 10 hex digits in 5 bytes, the value the id packed (id_pack). Its buckets are
-- one linear hash table (the digest's first 32 bits are the hash), P.."hm" holding m (buckets)
-- and n (heads): a new bucket splits off whenever there are more than HISTORY_LOAD heads a
-- bucket, and the sweep drops the dead heads (prune_history.lua).
local HISTORY_STATE = nil

local function h_state()
  if not HISTORY_STATE then
    local got = redis.call('HMGET', P .. K_HISTORY_META, 'm', 'n')
    local m = tonumber(got[1]) or 1
    HISTORY_STATE = {m = m, m0 = m, n = tonumber(got[2]) or 0, added = 0}
  end
  return HISTORY_STATE
end

local function h_key(d)
  return P .. K_HISTORY .. bucket_of(tonumber(string.sub(d, 1, 8), 16), h_state().m)
end

local function h_field(d) return hex_bin(d) end

-- heads dropped (history.lua, prune_history.lua): counted, so that the table splits on live heads
local function h_dropped(count)
  if count > 0 then redis.call('HINCRBY', P .. K_HISTORY_META, 'n', -count) end
end

-- move the heads of bucket m - 2^L whose hash falls in the new bucket m
local function h_split(st)
  local lo = 1
  while lo * 2 <= st.m do lo = lo * 2 end
  local from, to = P .. K_HISTORY .. (st.m - lo), P .. K_HISTORY .. st.m
  local flat, moved = redis.call('HGETALL', from), {}
  for k = 1, #flat, 2 do
    if struct.unpack('>I4', flat[k]) % (lo * 2) == st.m then
      redis.call('HSET', to, flat[k], flat[k + 1])
      moved[#moved + 1] = flat[k]
    end
  end
  if #moved > 0 then redis.call('HDEL', from, unpack(moved)) end
  st.m = st.m + 1
end

-- a new head splits a bucket off as soon as the table is over its load, within the call (an
-- enqueue call may add a thousand heads: a bucket must never pass the listpack's 512 entries,
-- for Redis never turns a hashtable back into a listpack)
local function remember(id, rec)
  local prev, any = {}, false
  local st = h_state()
  for k, d in ipairs(digests(rec)) do
    local key, field = h_key(d), h_field(d)
    local p = redis.call('HGET', key, field)
    redis.call('HSET', key, field, id_pack(id))
    if p then
      p = id_unpack(p)
    else
      st.n, st.added = st.n + 1, st.added + 1
      if st.n > HISTORY_LOAD * st.m then h_split(st) end
    end
    if p and p ~= id then prev[k] = p; any = true else prev[k] = '' end
  end
  if any then rec.hp = prev else rec.hp = nil end
end

-- after the last remember() of a call: the count and the buckets
local function history_done()
  local st = HISTORY_STATE
  if not st or st.added == 0 then return end
  redis.call('HINCRBY', P .. K_HISTORY_META, 'n', st.added)
  if st.m ~= st.m0 then redis.call('HSET', P .. K_HISTORY_META, 'm', st.m) end
  HISTORY_STATE = nil
end
