-- GCRA for several limits at once, in Redis: lease up to `want` tokens of every limit, or none of any.
--
-- KEYS[i]  the TAT of limit i: microseconds of Redis's clock at which it is fully rested (an integer string)
-- ARGV     per limit, four numbers: interval_us (seconds per request x 1e6), capacity_us (burst x interval),
--          want (tokens asked for, >= 1), owed (requests the instance admitted on its own share while Redis
--          was away: they move the TAT forward first, whether or not anything is granted now)
-- Reply    {admitted (1|0), then per limit: granted, remaining, retry_us, reset_us}
--          granted    tokens leased now (0 for every limit when admitted is 0)
--          remaining  tokens Redis would still lease at once after this call
--          retry_us   when this limit refused: microseconds until one token fits (0 otherwise)
--          reset_us   microseconds until the limit is fully rested (TAT - now, after the grant)
--
-- The clock is Redis's (TIME), so the instances' clocks never matter. A refusal writes nothing but what is
-- owed: a client above the rate is still admitted at exactly the rate. Keys expire when fully rested (PX is in milliseconds, the TAT
-- in microseconds: the TTL is (TAT - now) / 1000, never more).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats, fits = {}, {}
local admitted = 1
for i = 1, n do
  local interval, capacity, owed = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  if tat < now then tat = now end
  tat = tat + owed * interval
  tats[i] = tat
  local free = math.floor((now + capacity - tat) / interval + 1e-6)
  if free < 1 then
    admitted = 0
    free = 0
  end
  fits[i] = free
end
local reply = {admitted}
for i = 1, n do
  local interval, capacity, want = tonumber(ARGV[4 * i - 3]), tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 1])
  local owed = tonumber(ARGV[4 * i])
  local tat, granted, retry = tats[i], 0, 0
  if admitted == 1 then
    granted = math.min(want, fits[i])
    tat = math.ceil(tat + granted * interval)
  end
  if admitted == 1 or owed > 0 then
    tat = math.ceil(tat)
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  end
  if admitted == 0 and fits[i] == 0 then
    retry = math.ceil(tat + interval - capacity - now)
    if retry < 1 then retry = 1 end
  end
  local remaining = math.floor((now + capacity - tat) / interval + 1e-6)
  if remaining < 0 then remaining = 0 end
  reply[#reply + 1] = granted
  reply[#reply + 1] = remaining
  reply[#reply + 1] = retry
  reply[#reply + 1] = tat - now
end
return reply
