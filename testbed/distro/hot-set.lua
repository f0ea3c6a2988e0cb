-- wrk's requests for a distro guest's nginx (softpage_testbed.distro.run_wrk): the application's
-- files are f00000 ... f<N-1> (testbed/build.sh stage app_data). Requests go to the hot set, the
-- first HOT_FRACTION of them, with a skew: file i = floor(hot * u^SKEW), u uniform in [0, 1), so
-- SKEW 1 is uniform over the hot set and larger values favour its first files. The rest of the
-- files are for the page cache only (cached but cold).
-- SEED makes the sequence of files the same from run to run (wrk -t1: one thread draws them).
--   wrk -t1 -s hot-set.lua http://ADDRESS/ -- NFILES HOT_FRACTION SKEW SEED
local hot, skew = 1, 1.0

function init(args)
   local nfiles = tonumber(args[1])
   hot = math.max(1, math.floor(nfiles * tonumber(args[2])))
   skew = tonumber(args[3])
   math.randomseed(tonumber(args[4]))
end

function request()
   local index = math.floor(hot * math.random() ^ skew)
   return wrk.format("GET", string.format("/f%05d", index))
end

-- One JSON line after wrk's own summary, for the harness.
function done(summary, latency, requests)
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "bytes": %d, "errors_connect": %d, "errors_read": %d, ' ..
      '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "latency_p50_us": %d, ' ..
      '"latency_p99_us": %d, "latency_max_us": %d}\n',
      summary.requests, summary.duration, summary.bytes, summary.errors.connect,
      summary.errors.read, summary.errors.write, summary.errors.status, summary.errors.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
