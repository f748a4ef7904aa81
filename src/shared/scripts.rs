//! The Lua scripts the gateways run in Redis. Each touches keys of one hash tag only, so
//! under Redis Cluster each runs on one node, and each is one round trip (`EVALSHA`,
//! loaded on first use). Time is Redis's own (`TIME`): gateways' clocks may disagree, the
//! one Redis clock cannot disagree with itself.

/// GCRA (the algorithm of the in-process limiters) on one bucket, taking up to `n`
/// requests at once (a gateway's lease, see `lease.rs`), and for a signed request its
/// replay record.
///
/// `KEYS[1]`: the bucket (its theoretical arrival time, microseconds); `KEYS[2]`, when
/// given: the set of the key's signatures with this one's timestamp.
/// `ARGV[1]`: microseconds between requests at the sustained rate; `ARGV[2]`: burst;
/// `ARGV[3]`: how long the set lives, milliseconds; `ARGV[4]`: `n`; with `KEYS[2]`:
/// `ARGV[5]`, the signature's record (its hash), and `ARGV[6]`, the epoch key of this
/// node ('' for none), read with the record so that the gateway knows whether the record
/// met the node's data or an emptied node. Under Redis Cluster that key is in another slot
/// of the same node, which is why it is an argument: a script may touch keys of other
/// slots of its node, but not declare them.
///
/// Returns `{granted, remaining, epoch}` (1 ≤ granted ≤ n; remaining: what the bucket
/// still holds), `{0, wait_us, epoch}` (nothing to grant) or `{-1, 0, epoch}` (the
/// signature was accepted before); `epoch`: the epoch key's value, nil when missing or
/// not given, '' when it could not be read (under Redis Cluster: on another node, as when
/// this script was redirected to a master importing the slot) — then the signature is not
/// recorded either: the gateway cannot vouch for it, and a retry of the same request must
/// not find it recorded. A request over its limit records no signature (it was not
/// accepted, and a key sending far over its limit must not fill Redis with records); a
/// replay takes nothing.
pub const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[4])
local epoch = false
if ARGV[6] and ARGV[6] ~= '' then
  epoch = redis.pcall('GET', ARGV[6])
  if type(epoch) == 'table' then epoch = '' end
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local free = math.floor((now + step * burst - tat) / step)
if free < 1 then
  return {0, tat + step - step * burst - now, epoch}
end
if #KEYS > 1 and epoch ~= '' then
  if redis.call('SADD', KEYS[2], ARGV[5]) == 0 then
    return {-1, 0, epoch}
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
local n = math.min(want, free)
local new = tat + n * step
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1)
return {n, free - n, epoch}
";

/// Records one signature (under Redis Cluster; on one Redis the records of a worker go in
/// one pipeline, `batch.rs`) and reads its node's epoch with it (first, then the record:
/// a script runs whole, so the order only decides what an unreadable epoch leaves), like
/// `TAKE`.
///
/// `KEYS[1]`: the set of the key's signatures with this one's timestamp. `ARGV[1]`: the
/// record; `ARGV[2]`: how long the set lives, milliseconds; `ARGV[3]`: the node's epoch
/// key ('' for none). Returns `{1 (recorded now) or 0 (there already), epoch}`, and
/// `{1, ''}` without recording when the epoch could not be read (as `TAKE`).
pub const RECORD: &str = r"
local epoch = false
if ARGV[3] ~= '' then
  epoch = redis.pcall('GET', ARGV[3])
  if type(epoch) == 'table' then return {1, ''} end
end
local added = redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {added, epoch}
";

/// Adds usage deltas to one hash and keeps the latest `last_used`; adds the requests to
/// the hour's and the day's counts too (the history the console charts).
///
/// `KEYS[1]`: the usage hash; `KEYS[2]`, `KEYS[3]`: this hour's and this day's counts (a
/// field per key). `ARGV[1]`, `ARGV[2]`: in how many ms those two expire (once out of the
/// history's window; `PEXPIRE`, which the documented ACL already allows, rather than
/// `EXPIREAT`). Then groups of six: key id, user, requests, errors,
/// rate-limited, last used (unix seconds, 0: none).
pub const ADD_USAGE: &str = r"
local counted = false
for i = 3, #ARGV, 6 do
  local k = ARGV[i]
  redis.call('HSET', KEYS[1], k .. '|user', ARGV[i + 1])
  redis.call('HINCRBY', KEYS[1], k .. '|requests', ARGV[i + 2])
  if tonumber(ARGV[i + 2]) > 0 then
    redis.call('HINCRBY', KEYS[2], k, ARGV[i + 2])
    redis.call('HINCRBY', KEYS[3], k, ARGV[i + 2])
    counted = true
  end
  redis.call('HINCRBY', KEYS[1], k .. '|errors', ARGV[i + 3])
  redis.call('HINCRBY', KEYS[1], k .. '|rate_limited', ARGV[i + 4])
  local seen = tonumber(redis.call('HGET', KEYS[1], k .. '|last_used') or '0')
  if tonumber(ARGV[i + 5]) > seen then
    redis.call('HSET', KEYS[1], k .. '|last_used', ARGV[i + 5])
  end
end
if counted then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return 1
";

/// One gateway's heartbeat: announces it, forgets gateways silent for `ARGV[2]` ms, and
/// reads the fleet's epoch (set once by the first gateway to meet this Redis).
///
/// `KEYS[1]`: the sorted set of gateways; `KEYS[2]`: the epoch. `ARGV[1]`: this gateway's
/// id; `ARGV[2]`: silence that counts as gone, ms; `ARGV[3]`: an epoch to set if none.
/// Returns `{gateways alive, epoch, Redis's clock in unix ms}`.
pub const HEARTBEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
redis.call('SET', KEYS[2], ARGV[3], 'NX')
return {redis.call('ZCARD', KEYS[1]), redis.call('GET', KEYS[2]), now}
";

/// Sets an epoch key once (`ARGV[1]`) and returns its value: the first gateway to meet
/// this Redis sets it, every later read finds the same value until the data is lost.
pub const SET_EPOCH: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

/// How the node asked may drop keys before they expire: its `maxmemory-policy`, its
/// `maxmemory` (bytes, 0: no limit) and how many keys it evicted since it started (or its
/// stats were reset). Read-only.
///
/// `KEYS[1]`: any key of the node (under Redis Cluster its slot picks the node; it is
/// not read). Returns `{policy, maxmemory, evicted}` as strings; `{'', '0', '-1'}` when
/// the user may not run `INFO` (an ACL without `+info`).
pub const EVICTION: &str = r"
local mem = redis.pcall('INFO', 'memory')
local stats = redis.pcall('INFO', 'stats')
if type(mem) ~= 'string' or type(stats) ~= 'string' then
  return {'', '0', '-1'}
end
return {
  string.match(mem, 'maxmemory_policy:([%w%-]+)') or '',
  string.match(mem, '\nmaxmemory:(%d+)') or '0',
  string.match(stats, 'evicted_keys:(%d+)') or '-1'
}
";

/// The fleet's replay fence: signatures with a timestamp before it (unix seconds) may have
/// been accepted before Redis lost its data. Raises it to `ARGV[1]` when that is later,
/// still ahead and at most `ARGV[2]` seconds ahead (by Redis's clock: a gateway whose clock
/// is far ahead cannot fence the fleet for longer than one fence); it then lives until it
/// has passed. Returns it (0: none).
///
/// `KEYS[1]`: the fence. `ARGV[1]`: this gateway's fence, 0 for none; `ARGV[2]`: how far
/// ahead a fence may reach, seconds.
pub const FENCE: &str = r"
local now = tonumber(redis.call('TIME')[1])
local fence = tonumber(redis.call('GET', KEYS[1]) or '0')
local mine = math.min(tonumber(ARGV[1]), now + tonumber(ARGV[2]))
if mine > fence and mine > now then
  redis.call('SET', KEYS[1], string.format('%d', mine), 'PX', (mine - now) * 1000)
  fence = mine
end
return fence
";
