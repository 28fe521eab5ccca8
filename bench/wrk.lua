-- wrk script for bench/run: random request paths (and bodies), extra headers, one parseable result line.
--
--   wrk -t1 -c16 -d10s -s bench/wrk.lua http://127.0.0.1:PORT -- PATH_TEMPLATE LOW HIGH [ARG ...]
--
-- PATH_TEMPLATE holds one %d, replaced for every request by a random integer in [LOW, HIGH],
-- e.g. "/products?id=eq.%d" 1 5000. Each further ARG is one of:
--   "Name:value"     a request header;
--   "method=METHOD"  the HTTP method (default GET);
--   "body=TEMPLATE"  a request body; its %d (if any) gets the same random integer as the path, e.g.
--                    /orders 1 1000 method=POST 'body={"user_id": %d}' "Content-Type: application/json";
--   "header-file=Name:PATH"  a header whose value is picked at random for each request from the lines of
--                    the file PATH (blank lines skipped), e.g. "header-file=apikey:/tmp/keys" with one API key
--                    per line: requests of many apps over the same connections (bench/curves.py);
--   "error-if-body=TEXT"  also count an answer with a status below 400 as an error when its body holds
--                    TEXT, e.g. 'error-if-body="errors":' for GraphQL, which answers an error in
--                    execution with 200 and an "errors" key. Only with this argument does wrk read the
--                    bodies and call the script for each answer (a cost to the load generator).
-- A path or body without %d is sent as it is. wrk adds Content-Length to a request with a body.
-- done() prints a single line "BENCH_RESULT {json}" with req/s and p50/p99 latency in ms; with
-- error-if-body its "errors" include those answers, and "body_errors" counts them alone.

local template = "/"
local low, high = 1, 1
local method = "GET"
local body_template = nil
local rotating = {}  -- from "header-file=": { name = ..., values = { ... } } per header
local thread_counter = 0
local threads = {}          -- for done(), which reads each thread's body_errors
error_text = nil            -- from "error-if-body=" (globals, so that done() can read them with thread:get)
body_errors = 0

function setup(thread)
  thread_counter = thread_counter + 1
  thread:set("thread_id", thread_counter)
  threads[thread_counter] = thread
end

-- Installed as the global `response` by init() only with "error-if-body=": wrk reads the answers'
-- bodies and calls the script for each answer only when it has a response function.
local function count_body_error(status, headers, body)
  if status < 400 and body and string.find(body, error_text, 1, true) then
    body_errors = body_errors + 1
  end
end

function init(args)
  template = args[1] or "/"
  low = tonumber(args[2]) or 1
  high = tonumber(args[3]) or low
  for i = 4, #args do
    local arg = args[i]
    -- "header-file=", "method=" and "body=" first: a JSON body holds ':' too, and '=' is never part of a header name.
    if string.sub(arg, 1, 12) == "header-file=" then
      local name, path = string.match(string.sub(arg, 13), "^([^:]+):(.+)$")
      local values = {}
      local file = name and io.open(path, "r")
      if not file then
        error("header-file=" .. string.sub(arg, 13) .. ": expected Name:PATH of a readable file")
      end
      for line in file:lines() do
        local value = string.match(line, "^%s*(.-)%s*$")
        if value ~= "" then
          values[#values + 1] = value
        end
      end
      file:close()
      if #values == 0 then
        error("header-file " .. path .. " has no values")
      end
      rotating[#rotating + 1] = { name = name, values = values }
    elseif string.sub(arg, 1, 7) == "method=" then
      method = string.upper(string.sub(arg, 8))
    elseif string.sub(arg, 1, 5) == "body=" then
      body_template = string.sub(arg, 6)
    elseif string.sub(arg, 1, 14) == "error-if-body=" then
      error_text = string.sub(arg, 15)
      response = count_body_error
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
  for i = 1, #rotating do
    local header = rotating[i]
    wrk.headers[header.name] = header.values[math.random(#header.values)]
  end
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
  local checked, in_bodies = false, 0
  for _, thread in ipairs(threads) do
    if thread:get("error_text") then
      checked = true
    end
    in_bodies = in_bodies + (tonumber(thread:get("body_errors")) or 0)
  end
  io.write(string.format(
    'BENCH_RESULT {"tool": "wrk", "requests": %d, "errors": %d, "non_2xx": %d, "socket_errors": %d, '
      .. '"duration_s": %.3f, "rps": %.1f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f%s}\n',
    summary.requests, failed + in_bodies, errors.status, failed - errors.status, seconds,
    summary.requests / seconds, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, checked and string.format(', "body_errors": %d', in_bodies) or ""))
end
