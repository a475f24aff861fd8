-- The webhook deliverer's lease and cursor (worker/webhook_state.py), fenced by the lease token.
-- Loaded on its own (no prelude: it builds no key name).
-- KEYS[1] the lease, KEYS[2] the webhook hash
-- ARGV[1] the mode, ARGV[2] the caller's lease token, then per mode:
--   renew    ARGV[3] lease ms                  -> 1 held (expiry pushed back), 0 not ours
--   release                                     -> 1 released, 0 not ours
--   advance  ARGV[3] stream id, ARGV[4] ordinal ('' unknown), ARGV[5] events delivered,
--            ARGV[6] gaps delivered, ARGV[7] now (ms)
--            -> 1 moved, 0 not ours (a stale leader: the cursor stays), -1 not ahead of it
--   init     as advance, where no cursor is yet (the first leader starts at the stream's end)
-- The fence is the token check in the same script as the write: a leader whose lease expired
-- and went to another worker can still POST (a duplicate, allowed) but never moves the cursor.
local mode, token = ARGV[1], ARGV[2]
if redis.call('GET', KEYS[1]) ~= token then return 0 end
if mode == 'renew' then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
elseif mode == 'release' then
  redis.call('DEL', KEYS[1])
  return 1
end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local current = redis.call('HGET', KEYS[2], 'cursor')
if mode == 'init' and current then return -1 end
if current then
  local cms, cseq = parse(current)
  local nms, nseq = parse(ARGV[3])
  if nms < cms or (nms == cms and nseq <= cseq) then return -1 end
end
redis.call('HSET', KEYS[2], 'cursor', ARGV[3], 'leader', token)
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[2], 'ordinal')
else
  redis.call('HSET', KEYS[2], 'ordinal', ARGV[4])
end
if tonumber(ARGV[5]) > 0 or tonumber(ARGV[6]) > 0 then
  redis.call('HINCRBY', KEYS[2], 'delivered', tonumber(ARGV[5]))
  redis.call('HINCRBY', KEYS[2], 'gaps', tonumber(ARGV[6]))
  redis.call('HSET', KEYS[2], 'delivered_at', ARGV[7])
end
return 1
