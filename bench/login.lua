-- Logs in as one account, again and again: POST /v1/login with its email and password.
-- Usage: wrk -s bench/login.lua URL -- EMAIL PASSWORD
-- Counts answers that were not 200, by status, as users-mix.lua does.
local threads = {}
failures = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = '{"email":"' .. args[1] .. '","password":"' .. args[2] .. '"}'
end

function response(status, headers, body)
  if status ~= 200 then
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
