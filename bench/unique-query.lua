-- Every request a new query string, so the response cache never has the entry and the guest
-- runs (and its database read) every time. Usage: wrk -s bench/unique-query.lua URL
local counter = 0

function setup(thread)
  thread:set("tid", math.random(1, 1000000000))
end

function request()
  counter = counter + 1
  return wrk.format(nil, wrk.path .. "?miss=" .. tid .. "-" .. counter)
end
