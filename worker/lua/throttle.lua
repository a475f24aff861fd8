-- KEYS: leases, backoff (of app), rate (of app)
-- ARGV: prefix, app, interval_ms (0 = no rate limit)[, batch_id]
-- With a batch_id, first the fenced lease check that precedes every HTTP attempt: -1 (and no
-- slot reserved) unless the batch's lease is still in the leases zset and not past its deadline.
-- Reserves the next call slot of the global rate limit (GCRA: one call per interval over all
-- workers) and returns how many ms to wait before sending; also honours a shared backoff set
-- after a 429 / 1008028 (the app's backoff key holds the epoch ms until which nobody sends).
local leases_key, backoff_key, rate_key = KEYS[1], KEYS[2], KEYS[3]
local interval = tonumber(ARGV[3])
local now = now_ms()
if ARGV[4] then
  local deadline = redis.call('ZSCORE', leases_key, ARGV[4])
  if not deadline or tonumber(deadline) <= now then return -1 end
end
local wait = 0
local until_ms = tonumber(redis.call('GET', backoff_key) or '0')
if until_ms > now then wait = until_ms - now end
if interval > 0 then
  local tat = tonumber(redis.call('GET', rate_key) or '0')
  local start = math.max(tat, now + wait)
  redis.call('SET', rate_key, start + interval, 'PX', math.floor(start + interval - now) + 1000)
  wait = start - now
end
return wait
