-- Publishes events through the `publisher` fixture: POST <url>?key=k<n> with a small body.
-- Usage: wrk -s bench/publish.lua URL -- KEYS [DELAY_MS [POISON_PERCENT [PER_REQUEST]]]
--   KEYS           keys to spread events over (random, 1000 by default)
--   DELAY_MS       wait before each request on a connection (0: as fast as possible); with C
--                  connections the rate is about C * 1000 / (DELAY_MS + latency) per second
--   POISON_PERCENT that share of events is `fail` (retried until it is a dead letter), each on
--                  a key of its own, so it parks no healthy key
--   PER_REQUEST    events per request (1 by default): more are published in one transaction
--                  (`?keys=a,b,...`), each on a random key; no poison then
local keys, pause, poison, per_request = 1000, 0, 0, 1
local counter = 0

-- Poison keys must not repeat across runs (a key with a dead letter parks its later events).
math.randomseed(os.time())

function setup(thread)
  thread:set("tid", math.random(1, 1000000000))
end

function init(args)
  keys = tonumber(args[1] or "1000")
  pause = tonumber(args[2] or "0")
  poison = tonumber(args[3] or "0")
  per_request = tonumber(args[4] or "1")
  math.randomseed(tid)
end

function delay()
  return pause
end

function request()
  counter = counter + 1
  if per_request > 1 then
    local batch = {}
    for i = 1, per_request do
      batch[i] = "k" .. math.random(1, keys)
    end
    -- In one order: each event locks its key's counter until the commit, and two transactions
    -- taking the same keys in opposite orders would deadlock.
    table.sort(batch)
    return wrk.format("POST", wrk.path .. "?keys=" .. table.concat(batch, ","), nil, "1")
  end
  if poison > 0 and math.random() * 100 < poison then
    return wrk.format("POST", wrk.path .. "?key=poison-" .. tid .. "-" .. counter, nil, "fail")
  end
  return wrk.format("POST", wrk.path .. "?key=k" .. math.random(1, keys), nil, "1")
end
