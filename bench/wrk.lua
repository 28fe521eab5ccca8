-- wrk script for bench/run: random request paths, extra headers, one parseable result line.
--
--   wrk -t1 -c16 -d10s -s bench/wrk.lua http://127.0.0.1:PORT -- PATH_TEMPLATE LOW HIGH [Name:value ...]
--
-- PATH_TEMPLATE holds one %d, replaced for every request by a random integer in [LOW, HIGH],
-- e.g. "/products?id=eq.%d" 1 5000. Each further argument "Name:value" becomes a request header.
-- done() prints a single line "BENCH_RESULT {json}" with req/s and p50/p99 latency in ms.

local template = "/"
local low, high = 1, 1
local thread_counter = 0

function setup(thread)
  thread_counter = thread_counter + 1
  thread:set("thread_id", thread_counter)
end

function init(args)
  template = args[1] or "/"
  low = tonumber(args[2]) or 1
  high = tonumber(args[3]) or low
  for i = 4, #args do
    local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
    if name then
      wrk.headers[name] = value
    end
  end
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

function request()
  return wrk.format("GET", string.format(template, math.random(low, high)))
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local errors = summary.errors
  local failed = errors.connect + errors.read + errors.write + errors.status + errors.timeout
  io.write(string.format(
    'BENCH_RESULT {"tool": "wrk", "requests": %d, "errors": %d, "non_2xx": %d, "socket_errors": %d, '
      .. '"duration_s": %.3f, "rps": %.1f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f}\n',
    summary.requests, failed, errors.status, failed - errors.status, seconds,
    summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000))
end
