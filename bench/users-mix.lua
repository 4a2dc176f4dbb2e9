-- The user-management mix for wrk: 90% GET /v1/users/{id}, 8% PATCH, 2% POST, with a skewed
-- (Zipf-like) popularity over the seeded ids. Writes carry an Idempotency-Key, as a careful
-- client's would. Usage: wrk -s bench/users-mix.lua URL -- IDS_FILE
local ids = {}
local counter = 0
local tag = ""
local threads = 0

-- Runs in the main state once per thread: gives each thread its own id, so the emails its
-- POSTs create never collide with another thread's (a collision would be a 409).
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  for line in io.lines(args[1]) do ids[#ids + 1] = line end
  tag = tid .. "-" .. os.time()
  math.randomseed(os.time() * 100 + tid)
end

local function write_headers()
  counter = counter + 1
  return { ["Content-Type"] = "application/json", ["Idempotency-Key"] = tag .. "-" .. counter }
end

function request()
  local r = math.random()
  -- u^4 puts most requests on a few ids, like real popularity.
  local id = ids[math.floor(#ids * math.random() ^ 4) + 1]
  if r < 0.90 then
    return wrk.format("GET", "/v1/users/" .. id)
  elseif r < 0.98 then
    return wrk.format("PATCH", "/v1/users/" .. id, write_headers(), '{"name":"n' .. math.random(1, 1000000000) .. '"}')
  else
    local headers = write_headers()
    return wrk.format("POST", "/v1/users", headers,
      '{"email":"b' .. tag .. "-" .. counter .. '@example.com","name":"B","password":"bench-password"}')
  end
end
