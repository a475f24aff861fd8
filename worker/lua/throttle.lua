-- ARGV: prefix, app, interval_ms (0 = no rate limit)[, batch_id]
-- With a batch_id, first the fenced lease check that precedes every HTTP attempt: -1 (and no
-- slot reserved) unless the batch's lease is still in P.."leases" and not past its deadline.
-- Reserves the next call slot of the global rate limit (GCRA: one call per interval over all
-- workers) and returns how many ms to wait before sending; also honours a shared backoff set
-- after a 429 / 1008028 (P.."backoff:"..app holds the epoch ms until which nobody sends).
local app, interval = ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if ARGV[4] then
  local deadline = redis.call('ZSCORE', P .. 'leases', ARGV[4])
  if not deadline or tonumber(deadline) <= now then return -1 end
end
local wait = 0
local until_ms = tonumber(redis.call('GET', P .. 'backoff:' .. app) or '0')
if until_ms > now then wait = until_ms - now end
if interval > 0 then
  local key = P .. 'rate:' .. app
  local tat = tonumber(redis.call('GET', key) or '0')
  local start = math.max(tat, now + wait)
  redis.call('SET', key, start + interval, 'PX', math.floor(start + interval - now) + 1000)
  wait = start - now
end
return wait
