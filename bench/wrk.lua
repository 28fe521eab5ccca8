-- wrk script for bench/run: random request paths (and bodies), extra headers, one parseable result line.
--
--   wrk -t1 -c16 -d10s -s bench/wrk.lua http://127.0.0.1:PORT -- PATH_TEMPLATE LOW HIGH [ARG ...]
--
-- PATH_TEMPLATE holds one %d, replaced for every request by a random integer in [LOW, HIGH],
-- e.g. "/products?id=eq.%d" 1 5000. Each further ARG is one of:
--   "Name:value"     a request header;
--   "method=METHOD"  the HTTP method (default GET);
--   "body=TEMPLATE"  a request body; its %d (if any) gets the same random integer as the path, e.g.
--                    /orders 1 1000 method=POST 'body={"user_id": %d}' "Content-Type: application/json".
-- A path or body without %d is sent as it is. wrk adds Content-Length to a request with a body.
-- done() prints a single line "BENCH_RESULT {json}" with req/s and p50/p99 latency in ms.

local template = "/"
local low, high = 1, 1
local method = "GET"
local body_template = nil
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
    local arg = args[i]
    -- "method=" and "body=" first: a JSON body holds ':' too, and '=' is never part of a header name.
    if string.sub(arg, 1, 7) == "method=" then
      method = string.upper(string.sub(arg, 8))
    elseif string.sub(arg, 1, 5) == "body=" then
      body_template = string.sub(arg, 6)
    else
      local name, value = string.match(arg, "^([^:]+):%s*(.*)$")
      if name then
        wrk.headers[name] = value
      end
    end
  end
  math.randomseed(os.time() * 1000 + (thread_id or 0))
end

-- A template without %d is returned unchanged (string.format ignores the extra argument, but a
-- literal % elsewhere in it would not survive string.format, hence the check).
local function fill(text, n)
  if string.find(text, "%d", 1, true) then
    return string.format(text, n)
  end
  return text
end

function request()
  local n = math.random(low, high)
  if body_template then
    return wrk.format(method, fill(template, n), nil, fill(body_template, n))
  end
  return wrk.format(method, fill(template, n))
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
