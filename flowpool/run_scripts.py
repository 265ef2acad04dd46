"""The Lua scripts that move a run from one state to the next in one atomic step (:class:`~flowpool.runs.RunStore`
registers and calls them).

Each names its KEYS and ARGV in locals at the top; the store passes them in
that order.
"""
from __future__ import annotations

__all__ = ["ABANDON", "APPEND_CHUNKS", "APPEND_OUTPUT", "BEGIN", "CLAIM", "FINISH", "RATE", "RENEW_SLOT"]

# Mark a queued run as running on a worker, with a lease the worker keeps
# fresh, and index it by its hard deadline. The claim token names this one
# delivery of the run: a claim Redis ran but whose answer was lost (a
# timeout) is answered 1 again when retried, and no other delivery's is.
# The run's concurrency slot (its account's, the key built from the record's
# account and the parts ARGV[7..8], flowpool.quotas.key_parts) is scored from
# now on by its lease's expiry on Redis's clock (as every slot is scored and
# pruned: the workers' clocks may be off), which the worker's heartbeat moves
# on with the lease (RENEW_SLOT): a killed worker's slots lapse with its
# leases. ZADD, not XX: the slot is the run's whether or not BEGIN's is still
# there. The slots key is kept at least until the run's hard deadline.
CLAIM = """
local run_key, lease_key, runs_active_key = KEYS[1], KEYS[2], KEYS[3]
local worker, started_at, lease_ms, request_id, deadline, claim = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6]
local slots_head, slots_tail = ARGV[7], ARGV[8]
local status = redis.call('HGET', run_key, 'status')
if status == 'running' and redis.call('HGET', run_key, 'claim') == claim then return 1 end
if status ~= 'queued' then return 0 end
redis.call('HSET', run_key, 'status', 'running', 'started_at', started_at, 'worker', worker, 'claim', claim)
redis.call('SET', lease_key, worker, 'PX', lease_ms)
redis.call('ZADD', runs_active_key, deadline, request_id)
local account = redis.call('HGET', run_key, 'account')
if account then
  local slots_key = slots_head .. cjson.decode(account) .. slots_tail
  local time = redis.call('TIME')
  local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  redis.call('ZADD', slots_key, (now_ms + tonumber(lease_ms)) / 1000, request_id)
  local keep_ms = math.max(math.ceil((tonumber(deadline) - tonumber(started_at)) * 1000), tonumber(lease_ms)) + 1000
  -- PTTL -1 (no expiry: the key ZADD just made) and -2 are below it too.
  local ttl = redis.call('PTTL', slots_key)
  if ttl < keep_ms then redis.call('PEXPIRE', slots_key, keep_ms) end
end
return 1
"""

# Renew a running run's concurrency slot with its lease, from its worker's
# heartbeat (tasks/worker.py; one call per run, in the beat's pipeline): the
# slot scored at the lease's expiry on Redis's clock and the slots key kept at
# least as long. ZADD, not XX: a slot that lapsed and was pruned while the
# beats were held up (a Redis outage) comes back, so the account takes no new
# run over its limit while this one still goes (one admitted during the lapse
# stays admitted), and stays among the accounts sharing the pool. Only while
# the record says the run
# is running under this worker (``worker`` as CLAIM wrote it, JSON): in the
# same step, so a slot its end (FINISH, ABANDON) gave back is never taken
# again. 1 if renewed, else 0.
RENEW_SLOT = """
local run_key, slots_key, accounts_key = KEYS[1], KEYS[2], KEYS[3]
local request_id, worker, lease_ms, account = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local record = redis.call('HMGET', run_key, 'status', 'worker')
if record[1] ~= 'running' or record[2] ~= worker then return 0 end
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', slots_key, (now_ms + lease_ms) / 1000, request_id)
-- The account shares the pool while it has a run going (an end that found its slots lapsed may have let it go).
redis.call('ZADD', accounts_key, 'GT', (now_ms + lease_ms) / 1000, account)
local keep_ms = lease_ms + 1000
if redis.call('PTTL', slots_key) < keep_ms then redis.call('PEXPIRE', slots_key, keep_ms) end
return 1
"""

# What every written end does for the run's account (FINISH and ABANDON, once
# the end is written, so an end not written counts nothing): its concurrency
# slot back, the account out of the active ones when it has none left, and
# the run counted in the account's usage of the day of its end (flowpool.usage):
# ``runs:<status>``, ``compute_ms`` (claimed to ended; 0 for a run never
# claimed) and the ``[field, amount]`` token increments of ``tokens_json``, each
# again under ``wf:<ref>:``; the metrics' per-account counters; and its webhook,
# if it has one, made due (unless ``notify`` is not '1': a run withdrawn
# because it could not be sent, whose caller forgets its webhook). The compute
# time is capped at the run's hard limit (its ``timeout_seconds`` plus the hard
# grace): a lost run ended by the reaper or a waiter minutes later held its
# worker no longer than that. The account is read from the record, so the keys
# are built here from their parts (flowpool.quotas.end_args). Needs
# ``run_key``, ``metrics_key``, ``accounts_key``, ``due_key``, ``webhook_key``,
# ``request_id``, ``finished``, ``tokens_json``, ``notify`` and ``END_FROM``,
# where the parts start in ARGV.
_END_ACCOUNTING = """
local slots_head, slots_tail, usage_head, usage_tail = ARGV[END_FROM], ARGV[END_FROM + 1], ARGV[END_FROM + 2],
  ARGV[END_FROM + 3]
local usage_ttl, hard_grace = ARGV[END_FROM + 4], tonumber(ARGV[END_FROM + 5])
local record = redis.call('HMGET', run_key, 'account', 'workflow', 'started_at', 'status', 'timeout_seconds')
if record[1] then
  local account = cjson.decode(record[1])
  local slots_key = slots_head .. account .. slots_tail
  redis.call('ZREM', slots_key, request_id)
  -- Lapsed slots (runs whose end was never written) do not keep the account among those sharing the pool.
  -- Pruned by Redis's clock, as slots are scored (``finished``, the caller's, counts only the compute time).
  local time = redis.call('TIME')
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', tonumber(time[1]) + tonumber(time[2]) / 1000000)
  if redis.call('EXISTS', slots_key) == 0 then redis.call('ZREM', accounts_key, account) end
  local compute_ms = 0
  if record[3] then compute_ms = math.max(0, math.floor((tonumber(finished) - tonumber(record[3])) * 1000 + 0.5)) end
  local soft = tonumber(record[5] or '')
  if soft then compute_ms = math.min(compute_ms, math.floor((soft + hard_grace) * 1000 + 0.5)) end
  local adds = {{'runs:' .. record[4], 1}, {'compute_ms', compute_ms}}
  local tokens = 0
  for _, add in ipairs(cjson.decode(tokens_json)) do
    adds[#adds + 1] = add
    if add[1] == 'tokens' then tokens = add[2] end
  end
  local usage_key = usage_head .. account .. usage_tail
  local per_workflow = 'wf:' .. cjson.decode(record[2] or '""') .. ':'
  for _, add in ipairs(adds) do
    if add[2] ~= 0 then
      redis.call('HINCRBY', usage_key, add[1], add[2])
      redis.call('HINCRBY', usage_key, per_workflow .. add[1], add[2])
    end
  end
  redis.call('EXPIRE', usage_key, usage_ttl)
  if compute_ms > 0 then redis.call('HINCRBY', metrics_key, 'account_compute_ms:' .. account, compute_ms) end
  if tokens ~= 0 then redis.call('HINCRBY', metrics_key, 'account_tokens:' .. account, tokens) end
end
if notify == '1' and redis.call('EXISTS', webhook_key) == 1 then redis.call('ZADD', due_key, finished, request_id) end
"""

# Write a run's end, only while it is still running under the claim that
# writes it: a run a waiter or the reaper already ended (lost) keeps that end,
# and an end written again after a lost answer is not written twice. The
# record's fields hold its log lines: their stream is left only ``tail_ms``,
# for the readers still following it. Then its account's part (_END_ACCOUNTING).
FINISH = """
local run_key, events_key, lease_key, runs_active_key, metrics_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local logs_key, accounts_key, due_key, webhook_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local request_id, claim, done, ttl_ms, counters_json, tail_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local finished, tokens_json, notify = ARGV[7], ARGV[8], '1'
local END_FROM, FIELDS_FROM = 9, 15
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
""" + _END_ACCOUNTING + """return 1
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
# is then left only ``tail_ms``). Then its account's part (_END_ACCOUNTING,
# no tokens: whatever its model calls used died with its worker); ``notify``
# '0' leaves its webhook alone.
ABANDON = """
local run_key, lease_key, events_key, runs_active_key, logs_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local metrics_key, accounts_key, due_key, webhook_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local expected, status, finished_at, error_json, done, ttl_ms, force = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
  ARGV[6], ARGV[7]
local request_id, tail_ms, notify = ARGV[8], ARGV[9], ARGV[10]
local finished, tokens_json, END_FROM = finished_at, '[]', 11
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
""" + _END_ACCOUNTING + """return 1
"""


# An account's limits (the operator's own over the defaults ARGV[DEFAULTS_FROM..+3]; 0 = none) and its
# request rate: GCRA over the account's rate key, a burst of ``rpm`` requests, then one every 60/rpm s, on
# Redis's clock. A request over the rate is refused here (``return refuse(...)``); otherwise ``rate_tat`` is
# what the key takes if the request is admitted (written then, by the caller). A refusal writes only its
# counter in the metrics: ``{'quota', limit, used, allowed, wait_ms}`` (flowpool.quotas.refusal).
# Needs ``quota`` (false: nothing checked), ``limits_key``, ``rate_key``, ``metrics_key`` and ``DEFAULTS_FROM``.
_LIMITS = """
local function refuse(name, used, allowed, wait_ms)
  redis.call('HINCRBY', metrics_key, 'quota_refusals:' .. name, 1)
  return {'quota', name, used, allowed, wait_ms}
end
local limit, now_ms, rate_tat = {0, 0, 0, 0}, 0, nil
if quota then
  local own = redis.call('HMGET', limits_key, 'concurrency', 'rpm', 'tokens_per_day', 'compute_seconds_per_day')
  for i = 1, 4 do limit[i] = tonumber(own[i] or ARGV[DEFAULTS_FROM + i - 1]) end
  local time = redis.call('TIME')
  now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local rpm = limit[2]
  if rpm > 0 then
    local interval = 60000 / rpm
    local tat = math.max(tonumber(redis.call('GET', rate_key) or 0), now_ms)
    local allow_at = tat + interval - 60000
    if now_ms < allow_at then
      return refuse('rpm', math.min(rpm, math.ceil((tat - now_ms) / interval)), rpm, math.ceil(allow_at - now_ms))
    end
    rate_tat = tat + interval
  end
end
local function take_rate()
  if rate_tat then
    redis.call('SET', rate_key, string.format('%.3f', rate_tat), 'PX', math.max(1, math.ceil(rate_tat - now_ms)))
  end
end
"""

# Take one request of an account's rate (_LIMITS) outside BEGIN: a request joining a run in flight found by
# a cache with a Redis of its own. ``{'ok'}`` or the refusal.
RATE = """
local metrics_key, limits_key, rate_key = KEYS[1], KEYS[2], KEYS[3]
local quota, DEFAULTS_FROM = true, 1
""" + _LIMITS + """take_rate()
return {'ok'}
"""

# Start a run unless its result is cached or an identical run is in flight:
# one round trip for the workflow's revision check, the cache lookup, the
# single-flight lock, the account's quotas and the record. The API resolves
# workflows from memory; a revision that moved on answers 'stale' and it
# resolves again. A hit writes its own run record from the fields the worker
# stored with the entry, so a cache hit costs a single round trip.
# The cache keys are "" when the request is not cached. With an
# Idempotency-Key (KEYS[9], "" without one) a request repeating the key gets
# the run the key first named ('replay'), or 'conflict' when its fingerprint
# differs; a first run that never started ('expired') or is gone hands the
# key on; neither is refused by a quota nor consumes any. ``may_join`` "0": a
# request that must have a run of its own (its webhook is its run's) queues
# one beside the run in flight, without its lock.
# Quotas (flowpool.quotas; KEYS[11..15] "" for none): the rate (_LIMITS) applies
# to every request admitted (a hit, a join or a queued run); a run to be
# queued must also be under the account's concurrency (its slots: runs queued
# or running, by when each lapses) and today's token and compute budgets. A
# queued run takes a slot until ``slot_seconds`` past its queueing on Redis's
# clock (the longest its claim may still come: flowpool.quotas; its claim and
# its worker's heartbeats keep it from then on; its end gives it back) and a lane:
# within the account's share of the queue's slots (shared between the accounts
# with runs in flight; a share of 1 while the slots are unknown) 0, within 4
# shares 3, within 16 shares 6, else 9; 0 without fair share. ``ended`` "1":
# the record is a hit's, already ended (found by a cache with a Redis of its
# own): counted as a hit, no slot taken. Every run recorded is indexed by its
# workflow, its session and its account (KEYS[16]: the newest
# ``account_runs_kept`` kept). ARGV from RECORD_FROM on are the record's
# fields and values.
BEGIN = """
local run_key, workflow_runs_key, entry_key, lock_key, entry_record_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local workflow_key, session_runs_key, metrics_key, idem_key = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local runs_active_key = KEYS[10]
local limits_key, slots_key, rate_key, usage_key, accounts_key = KEYS[11], KEYS[12], KEYS[13], KEYS[14], KEYS[15]
local account_runs_key = KEYS[16]
local request_id, ttl_ms, queued_at, runs_kept, lock_ms = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local expected_rev, idem_ms, fingerprint, run_prefix, may_join = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local account, ref = ARGV[11], ARGV[12]
local queue_slots, fair, slot_seconds, usage_ttl, ended = ARGV[17], ARGV[18], ARGV[19], ARGV[20], ARGV[21]
local account_runs_kept = ARGV[22]
local DEFAULTS_FROM, RECORD_FROM = 13, 23
local quota = limits_key ~= ''
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
""" + _LIMITS + """
local function count_hit()
  if quota then
    redis.call('HINCRBY', usage_key, 'cache_hits', 1)
    redis.call('HINCRBY', usage_key, 'wf:' .. ref .. ':cache_hits', 1)
    redis.call('EXPIRE', usage_key, usage_ttl)
  end
end
-- Whether a run may be queued: nil, or the refusal. Leaves the account's runs in flight in ``inflight``.
local inflight = 0
local function may_queue()
  if not quota then return nil end
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now_ms / 1000)
  inflight = redis.call('ZCARD', slots_key)
  if limit[1] > 0 and inflight >= limit[1] then return refuse('concurrency', inflight, limit[1], 0) end
  if limit[3] > 0 or limit[4] > 0 then
    local used = redis.call('HMGET', usage_key, 'tokens', 'compute_ms')
    local tokens, compute_ms = tonumber(used[1] or 0), tonumber(used[2] or 0)
    if limit[3] > 0 and tokens >= limit[3] then return refuse('tokens_per_day', tokens, limit[3], 0) end
    if limit[4] > 0 and compute_ms >= limit[4] * 1000 then
      return refuse('compute_seconds_per_day', math.floor(compute_ms / 1000), limit[4], 0)
    end
  end
  return nil
end
local state = {'queued'}
if entry_key ~= '' then
  local hit = redis.call('GET', entry_key)
  if hit then
    local copied = redis.call('HGETALL', entry_record_key)
    redis.call('HINCRBY', metrics_key, 'cache_hits', 1)
    remember(request_id)
    take_rate()
    count_hit()
    if #copied == 0 then return {'hit', hit} end
    redis.call('HSET', run_key, unpack(ARGV, RECORD_FROM))
    redis.call('HSET', run_key, 'status', 'succeeded', 'cache_hit', 'true', 'started_at', queued_at,
               'finished_at', queued_at, unpack(copied))
    state = {'hit', hit, 'recorded'}
  else
    local leader = redis.call('GET', lock_key)
    if leader and may_join == '1' then
      remember(leader)
      take_rate()
      return {'join', leader}
    end
    local refused = may_queue()
    if refused then return refused end
    if not leader then redis.call('SET', lock_key, request_id, 'PX', lock_ms) end
  end
elseif ended ~= '1' then
  local refused = may_queue()
  if refused then return refused end
end
if state[1] == 'queued' then
  remember(request_id)
  take_rate()
  redis.call('HSET', run_key, unpack(ARGV, RECORD_FROM))
  -- Unfinished runs by deadline, for the reaper: queued, it must have ended when its lock would lapse.
  -- (A record written already ended, a cache hit found elsewhere, is not indexed.)
  if redis.call('HGET', run_key, 'status') == 'queued' then
    local deadline = tonumber(queued_at) + tonumber(lock_ms) / 1000
    redis.call('ZADD', runs_active_key, deadline, request_id)
    if quota then
      -- Its slot until a claim can no longer come (on Redis's clock, as slots are pruned), and the account
      -- among those sharing the pool until its last deadline.
      local slot_ms = math.ceil(tonumber(slot_seconds) * 1000)
      redis.call('ZADD', slots_key, (now_ms + slot_ms) / 1000, request_id)
      redis.call('ZREMRANGEBYSCORE', accounts_key, '-inf', now_ms / 1000)
      local sharing = redis.call('ZCARD', accounts_key)
      if not redis.call('ZSCORE', accounts_key, account) then sharing = sharing + 1 end
      -- Scored on Redis's clock, as the entries are pruned: till this run's deadline, or its slot's if later.
      redis.call('ZADD', accounts_key, 'GT', (now_ms + math.max(tonumber(lock_ms), slot_ms)) / 1000, account)
      -- The key goes with the account's last deadline, not before this slot lapses (never sooner than a claim
      -- or a heartbeat made it go: CLAIM, RENEW_SLOT).
      local keep_ms = math.max((math.ceil(tonumber(redis.call('ZSCORE', accounts_key, account))) + 1) * 1000 - now_ms,
                               slot_ms + 1000)
      local ttl = redis.call('PTTL', slots_key)
      if ttl < keep_ms then redis.call('PEXPIRE', slots_key, keep_ms) end
      local lane = 0
      if fair == '1' then
        local share = math.max(1, math.ceil(tonumber(queue_slots) / sharing))
        if inflight >= 16 * share then lane = 9 elseif inflight >= 4 * share then lane = 6
        elseif inflight >= share then lane = 3 end
      end
      state = {'queued', lane}
    end
  elseif ended == '1' then
    count_hit()
  end
end
redis.call('PEXPIRE', run_key, ttl_ms)
redis.call('ZADD', workflow_runs_key, queued_at, request_id)
redis.call('ZREMRANGEBYRANK', workflow_runs_key, 0, -tonumber(runs_kept) - 1)
redis.call('ZADD', session_runs_key, queued_at, request_id)
redis.call('PEXPIRE', session_runs_key, ttl_ms)
redis.call('ZADD', account_runs_key, queued_at, request_id)
redis.call('ZREMRANGEBYRANK', account_runs_key, 0, -tonumber(account_runs_kept) - 1)
redis.call('PEXPIRE', account_runs_key, ttl_ms)
return state
"""
