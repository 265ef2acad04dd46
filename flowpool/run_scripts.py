"""The Lua scripts that move a run from one state to the next in one atomic step (:class:`~flowpool.runs.RunStore`
registers and calls them).

Each names its KEYS and ARGV in locals at the top; the store passes them in
that order.
"""
from __future__ import annotations

__all__ = ["ABANDON", "APPEND_CHUNKS", "APPEND_OUTPUT", "BEGIN", "CLAIM", "FINISH"]

# Mark a queued run as running on a worker, with a lease the worker keeps
# fresh, and index it by its hard deadline. The claim token names this one
# delivery of the run: a claim Redis ran but whose answer was lost (a
# timeout) is answered 1 again when retried, and no other delivery's is.
CLAIM = """
local run_key, lease_key, runs_active_key = KEYS[1], KEYS[2], KEYS[3]
local worker, started_at, lease_ms, request_id, deadline, claim = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6]
local status = redis.call('HGET', run_key, 'status')
if status == 'running' and redis.call('HGET', run_key, 'claim') == claim then return 1 end
if status ~= 'queued' then return 0 end
redis.call('HSET', run_key, 'status', 'running', 'started_at', started_at, 'worker', worker, 'claim', claim)
redis.call('SET', lease_key, worker, 'PX', lease_ms)
redis.call('ZADD', runs_active_key, deadline, request_id)
return 1
"""

# Write a run's end, only while it is still running under the claim that
# writes it: a run a waiter or the reaper already ended (lost) keeps that end,
# and an end written again after a lost answer is not written twice. The
# record's fields hold its log lines: their stream is left only ``tail_ms``,
# for the readers still following it.
FINISH = """
local run_key, events_key, lease_key, runs_active_key, metrics_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local logs_key = KEYS[6]
local request_id, claim, done, ttl_ms, counters_json, tail_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local FIELDS_FROM = 7
if redis.call('HGET', run_key, 'status') ~= 'running' or redis.call('HGET', run_key, 'claim') ~= claim then
  return 0
end
redis.call('HSET', run_key, unpack(ARGV, FIELDS_FROM))
redis.call('XADD', events_key, '*', 'kind', 'done', 'data', done)
redis.call('PEXPIRE', events_key, ttl_ms)
redis.call('PEXPIRE', logs_key, tail_ms)
redis.call('PEXPIRE', run_key, ttl_ms)
redis.call('DEL', lease_key)
redis.call('ZREM', runs_active_key, request_id)
for _, counter in ipairs(cjson.decode(counters_json)) do redis.call('HINCRBY', metrics_key, counter, 1) end
return 1
"""

# How a chunk append adds the chunks ARGV[CHUNKS_FROM..CHUNKS_TO] (the first
# numbered first_index) to a run's events stream: only those past the index
# of the last chunk stored, so a batch written again (Redis ran the first
# write but its answer was lost), or a stale write landing after its retry,
# adds nothing it holds, whatever order the writes land in; a stream whose
# last entry is ``done`` takes none (``return 0``). Leaves ``added``; needs
# ``events_key``, ``first_index``, ``ttl_ms``, ``CHUNKS_FROM`` and ``CHUNKS_TO``.
_ADD_CHUNKS = """
local next_index = 0
local top = redis.call('XREVRANGE', events_key, '+', '-', 'COUNT', 1)[1]
if top then
  local fields = top[2]  -- kind, chunk or done, data, the JSON
  if fields[2] ~= 'chunk' then return 0 end
  next_index = cjson.decode(fields[4])['index'] + 1
end
local added = 0
for i = CHUNKS_FROM, CHUNKS_TO do
  if first_index + i - CHUNKS_FROM >= next_index then
    redis.call('XADD', events_key, '*', 'kind', 'chunk', 'data', ARGV[i])
    added = added + 1
  end
end
-- The stream expires with the record even if no end is ever written (its record gone, say).
if added > 0 then redis.call('PEXPIRE', events_key, ttl_ms) end
"""

# Append a run's emitted chunks (ARGV from 3 on, the first numbered ARGV[1])
# to its stream, each once; the stream lives ARGV[2] ms past the last.
APPEND_CHUNKS = """
local events_key = KEYS[1]
local first_index, ttl_ms = tonumber(ARGV[1]), ARGV[2]
local CHUNKS_FROM, CHUNKS_TO = 3, #ARGV
""" + _ADD_CHUNKS + """return added
"""

# Append a run's emitted chunks, as APPEND_CHUNKS does, and the log lines it
# sent with them, in one step, so a reader never sees a chunk without the
# lines logged before it, nor a line without the chunks emitted before it.
# The lines (three ARGV each from LINES_FROM on: how many chunks the run had
# emitted before it, whether it is the line saying the log was cut, its JSON
# as the record keeps it; the first numbered first_line) go to the log
# stream, each once as the chunks are (by index), and only while the run is
# running. A log entry's fields, in this order: index, after, cut, data
# (ABANDON reads them by position). The log stream expires with the record
# while the run goes (its end shortens that).
APPEND_OUTPUT = """
local events_key, logs_key, run_key = KEYS[1], KEYS[2], KEYS[3]
local first_index, chunk_count, first_line, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local CHUNKS_FROM = 5
local CHUNKS_TO = CHUNKS_FROM + chunk_count - 1
local LINES_FROM = CHUNKS_TO + 1
""" + _ADD_CHUNKS + """if redis.call('HGET', run_key, 'status') ~= 'running' then return added end
local next_line = 0
local last = redis.call('XREVRANGE', logs_key, '+', '-', 'COUNT', 1)[1]
if last then next_line = tonumber(last[2][2]) + 1 end  -- its fields: index, the number, ...
for i = LINES_FROM, #ARGV, 3 do
  local index = first_line + (i - LINES_FROM) / 3
  if index >= next_line then
    redis.call('XADD', logs_key, '*', 'index', index, 'after', ARGV[i], 'cut', ARGV[i + 1], 'data', ARGV[i + 2])
    added = added + 1
  end
end
redis.call('PEXPIRE', logs_key, ttl_ms)
return added
"""

# End a run that can no longer finish by itself: still queued (nobody took
# it), or running without a lease (its worker died). Atomic, so of two API
# processes noticing at once only one writes the end. The log lines it sent
# go into its record, as its worker would have written them (their stream
# is then left only ``tail_ms``).
ABANDON = """
local run_key, lease_key, events_key, runs_active_key, logs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local expected, status, finished_at, error_json, done, ttl_ms, force = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], ARGV[7]
local request_id, tail_ms = ARGV[8], ARGV[9]
local current = redis.call('HGET', run_key, 'status')
if current ~= expected then return 0 end
if current == 'running' and force ~= '1' and redis.call('EXISTS', lease_key) == 1 then return 0 end
redis.call('HSET', run_key, 'status', status, 'finished_at', finished_at, 'error', error_json)
local lines = redis.call('XRANGE', logs_key, '-', '+')
if #lines > 0 then
  local kept = {}
  for n, entry in ipairs(lines) do kept[n] = entry[2][8] end  -- its fields: index, n, after, n, cut, 0|1, data, JSON
  local logs_truncated = lines[#lines][2][6] == '1' and 'true' or 'false'
  redis.call('HSET', run_key, 'logs', '[' .. table.concat(kept, ',') .. ']', 'logs_truncated', logs_truncated)
  redis.call('PEXPIRE', logs_key, tail_ms)
end
redis.call('XADD', events_key, '*', 'kind', 'done', 'data', done)
redis.call('PEXPIRE', events_key, ttl_ms)
redis.call('ZREM', runs_active_key, request_id)
return 1
"""


# Start a run unless its result is cached or an identical run is in flight:
# one round trip for the workflow's revision check, the cache lookup, the
# single-flight lock and the record. The API resolves workflows from memory;
# a revision that moved on answers 'stale' and it resolves again.
# A hit writes its own run record from the fields the worker stored with the
# entry, so a cache hit costs a single round trip.
# The cache keys are "" when the request is not cached. With an
# Idempotency-Key (KEYS[9], "" without one) a request repeating the key gets
# the run the key first named ('replay'), or 'conflict' when its fingerprint
# differs; a first run that never started ('expired') or is gone hands the
# key on. ARGV from 10 on are the queued record's fields and values.
BEGIN = """
local run_key, workflow_runs_key, entry_key, lock_key, entry_record_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local workflow_key, session_runs_key, metrics_key, idem_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local runs_active_key = KEYS[10]
local request_id, ttl_ms, queued_at, runs_kept, lock_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local expected_rev, idem_ms, fingerprint, run_prefix = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local RECORD_FROM = 10
if (redis.call('HGET', workflow_key, 'rev') or '') ~= expected_rev then return {'stale'} end
local function remember(owner)
  if idem_key ~= '' then redis.call('SET', idem_key, owner .. ' ' .. fingerprint, 'PX', idem_ms) end
end
if idem_key ~= '' then
  local held = redis.call('GET', idem_key)
  if held then
    local sep = string.find(held, ' ', 1, true)
    local first = string.sub(held, 1, sep - 1)
    local first_status = redis.call('HGET', run_prefix .. first, 'status')
    if first_status and first_status ~= 'expired' then
      if string.sub(held, sep + 1) ~= fingerprint then return {'conflict', first} end
      return {'replay', first}
    end
  end
end
local state = {'queued'}
if entry_key ~= '' then
  local hit = redis.call('GET', entry_key)
  if hit then
    local copied = redis.call('HGETALL', entry_record_key)
    redis.call('HINCRBY', metrics_key, 'cache_hits', 1)
    remember(request_id)
    if #copied == 0 then return {'hit', hit} end
    redis.call('HSET', run_key, unpack(ARGV, RECORD_FROM))
    redis.call('HSET', run_key, 'status', 'succeeded', 'cache_hit', 'true', 'started_at', queued_at,
               'finished_at', queued_at, unpack(copied))
    state = {'hit', hit, 'recorded'}
  else
    local leader = redis.call('GET', lock_key)
    if leader then
      remember(leader)
      return {'join', leader}
    end
    redis.call('SET', lock_key, request_id, 'PX', lock_ms)
  end
end
if state[1] == 'queued' then
  remember(request_id)
  redis.call('HSET', run_key, unpack(ARGV, RECORD_FROM))
  -- Unfinished runs by deadline, for the reaper: queued, it must have ended when its lock would lapse.
  -- (A record written already ended, a cache hit found elsewhere, is not indexed.)
  if redis.call('HGET', run_key, 'status') == 'queued' then
    redis.call('ZADD', runs_active_key, tonumber(queued_at) + tonumber(lock_ms) / 1000, request_id)
  end
end
redis.call('PEXPIRE', run_key, ttl_ms)
redis.call('ZADD', workflow_runs_key, queued_at, request_id)
redis.call('ZREMRANGEBYRANK', workflow_runs_key, 0, -tonumber(runs_kept) - 1)
redis.call('ZADD', session_runs_key, queued_at, request_id)
redis.call('PEXPIRE', session_runs_key, ttl_ms)
return state
"""
