-- The user-management mix for wrk: 90% GET /v1/users/{id}, 9.8% PATCH, 0.2% POST, with a skewed
-- (Zipf-like) popularity over the seeded ids. Writes carry an Idempotency-Key, as a careful
-- client's would. Usage: wrk -s bench/users-mix.lua URL -- IDS_FILE [patch | login EMAIL PASSWORD]
-- With `patch`, every request is a PATCH of an id drawn uniformly (the write path alone); with
-- `login`, every request is a POST /v1/login as that account (IDS_FILE is not read then).
local ids = {}
local counter = 0
local tag = ""
local patch_only = false
local login_body = nil
local threads = {}
-- A global, so `done` can read each thread's copy with thread:get.
failures = {}

-- Runs in the main state once per thread: gives each thread its own id, so the emails its
-- POSTs create never collide with another thread's (a collision would be a 409).
function setup(thread)
  threads[#threads + 1] = thread
  thread:set("tid", #threads)
end

-- Counts the answers that were not 2xx, by status, so a run with errors says which.
function response(status, headers, body)
  if status >= 300 then
    local key = tostring(status)
    failures[key] = (failures[key] or 0) + 1
  end
end

function done(summary, latency, requests)
  local seen = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("failures") or {}) do
      seen[status] = (seen[status] or 0) + n
    end
  end
  for status, n in pairs(seen) do
    io.write(string.format("non-2xx: %s x %d\n", status, n))
  end
end

function init(args)
  if args[2] == "login" then
    login_body = '{"email":"' .. args[3] .. '","password":"' .. args[4] .. '"}'
    return
  end
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  patch_only = args[2] == "patch"
  tag = tid .. "-" .. os.time()
  math.randomseed(os.time() * 100 + tid)
end

-- wrk.format uses the headers it is given instead of the -H ones: copy those (the bearer token).
local function write_headers()
  counter = counter + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do headers[name] = value end
  headers["Content-Type"] = "application/json"
  headers["Idempotency-Key"] = tag .. "-" .. counter
  return headers
end

function request()
  if login_body then
    return wrk.format("POST", "/v1/login", { ["Content-Type"] = "application/json" }, login_body)
  end
  if patch_only then
    local id = ids[math.random(#ids)]
    return wrk.format("PATCH", "/v1/users/" .. id, write_headers(), '{"name":"n' .. math.random(1, 1000000000) .. '"}')
  end
  local r = math.random()
  -- u^4 puts most requests on a few ids, like real popularity.
  local id = ids[math.floor(#ids * math.random() ^ 4) + 1]
  if r < 0.90 then
    return wrk.format("GET", "/v1/users/" .. id)
  elseif r < 0.998 then
    return wrk.format("PATCH", "/v1/users/" .. id, write_headers(), '{"name":"n' .. math.random(1, 1000000000) .. '"}')
  else
    local headers = write_headers()
    return wrk.format("POST", "/v1/users", headers,
      '{"email":"b' .. tag .. "-" .. counter .. '@example.com","name":"B","password":"bench-password"}')
  end
end
