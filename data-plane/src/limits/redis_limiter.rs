//! The shared limiter: counters in Redis, each admission one atomic Lua script (one round trip:
//! EVALSHA; EVAL once after a Redis restart forgot the script), so a limit means the same with
//! one proxy or fifty.
//!
//! Keys of a scope, all under the hash tag of its org (one slot: the scripts touch an org and
//! one of its keys together), with `B` = `flex:lim:{ORG}:o` (the org) or `flex:lim:{ORG}:k:KEY`:
//! - `B:w` sorted set, the requests admitted in the last 60 s (member lease, score Redis time in
//!   ms): an exact sliding window, `ZCARD` is the rpm count;
//! - `B:wt` hash lease → tokens counted (the worst case until settled, then the real use) and
//!   `B:ws` their sum: the tpm count;
//! - `B:c` sorted set of concurrency leases (score: expiry); a lease lives 30 s (the lease TTL)
//!   unless its proxy refreshes it, so a killed proxy's slots come back;
//! - `B:r` sorted set of money reservations (score: expiry), `B:ra` hash lease → micro-dollars,
//!   `B:rs` their sum; an expired reservation moves to `B:x` (for an hour), so a late settle is
//!   still charged once;
//! - `B:d:YYYYMMDD`, `B:m:YYYYMM`: settled spend of the UTC day and month (by admission time,
//!   as the ledger dates requests).
//!
//! Time is Redis's (`TIME`), so proxies' clocks do not matter for the windows. Settles are
//! idempotent (tokens are set, not added; spend is charged only by the one call that removes the
//! reservation), so a settle whose reply was lost can be sent again.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Script};

use super::{
    BoxFuture, Decision, Demand, Granted, LeaseRef, LimitKind, Limiter, LimiterError, Reading,
    Refusal, ScopeCount, ScopeLimits, Settlement,
};

const COMMON: &str = r#"
local WINDOW = 60000
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function num(v)
  if v then return tonumber(v) or 0 end
  return 0
end
local function int(v) return string.format('%d', v) end
local function expire_window(w, wt, ws, now, tokens)
  local cutoff = now - WINDOW
  if not tokens then
    redis.call('ZREMRANGEBYSCORE', w, '-inf', cutoff)
    return
  end
  while true do
    local old = redis.call('ZRANGEBYSCORE', w, '-inf', cutoff, 'LIMIT', 0, 256)
    if #old == 0 then return end
    local amounts = redis.call('HMGET', wt, unpack(old))
    local sum = 0
    for _, a in ipairs(amounts) do sum = sum + num(a) end
    if sum ~= 0 then redis.call('DECRBY', ws, int(sum)) end
    redis.call('HDEL', wt, unpack(old))
    redis.call('ZREM', w, unpack(old))
    if #old < 256 then return end
  end
end
local function expire_reservations(r, ra, rs, x, now)
  local old = redis.call('ZRANGEBYSCORE', r, '-inf', now, 'LIMIT', 0, 256)
  if #old > 0 then
    local amounts = redis.call('HMGET', ra, unpack(old))
    local sum = 0
    for _, a in ipairs(amounts) do sum = sum + num(a) end
    if sum ~= 0 then redis.call('DECRBY', rs, int(sum)) end
    redis.call('HDEL', ra, unpack(old))
    redis.call('ZREM', r, unpack(old))
    for _, l in ipairs(old) do redis.call('ZADD', x, now, l) end
    redis.call('PEXPIRE', x, 3600000)
  end
  redis.call('ZREMRANGEBYSCORE', x, '-inf', now - 3600000)
end
"#;

/// KEYS: 10 per scope (w wt ws c r ra rs x d m). ARGV: lease, tokens, cost, lease ttl ms, scopes,
/// then rpm tpm concurrency daily monthly per scope. Returns {1, now, then per scope requests
/// tokens in_flight day month (before this request)} or {0, now, scope, kind, limit, used,
/// requested, retry_ms (-1: never, -2: next UTC day, -3: next UTC month)}.
const ADMIT: &str = r#"
local now = now_ms()
local lease = ARGV[1]
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local counts = {}
for i = 0, n - 1 do
  local k, a = i * 10, 6 + i * 5
  local rpm, tpm, conc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local w, wt, ws, c = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4]
  local r, ra, rs, x, d, m = KEYS[k + 5], KEYS[k + 6], KEYS[k + 7], KEYS[k + 8], KEYS[k + 9], KEYS[k + 10]
  local reqs, toks, inflight, day, month = 0, 0, 0, 0, 0
  if rpm > 0 or tpm > 0 then
    expire_window(w, wt, ws, now, tpm > 0)
    reqs = redis.call('ZCARD', w)
    if rpm > 0 and reqs + 1 > rpm then
      local first = redis.call('ZRANGE', w, 0, 0, 'WITHSCORES')
      local retry = WINDOW
      if #first == 2 then retry = tonumber(first[2]) + WINDOW - now end
      return {0, now, i, 1, rpm, reqs, 1, retry}
    end
    if tpm > 0 then
      toks = num(redis.call('GET', ws))
      if tokens > tpm then return {0, now, i, 2, tpm, toks, tokens, -1} end
      if toks + tokens > tpm then
        local need, freed, retry = toks + tokens - tpm, 0, WINDOW
        local entries = redis.call('ZRANGE', w, 0, 255, 'WITHSCORES')
        for j = 1, #entries, 2 do
          freed = freed + num(redis.call('HGET', wt, entries[j]))
          if freed >= need then
            retry = tonumber(entries[j + 1]) + WINDOW - now
            break
          end
        end
        return {0, now, i, 2, tpm, toks, tokens, retry}
      end
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', c, '-inf', now)
    inflight = redis.call('ZCARD', c)
    if inflight + 1 > conc then return {0, now, i, 3, conc, inflight, 1, 1000} end
  end
  if daily > 0 or monthly > 0 then
    expire_reservations(r, ra, rs, x, now)
    local held = num(redis.call('GET', rs))
    day = num(redis.call('GET', d)) + held
    month = num(redis.call('GET', m)) + held
    local need = cost
    if need < 1 then need = 1 end
    if daily > 0 and day + need > daily then return {0, now, i, 4, daily, day, cost, -2} end
    if monthly > 0 and month + need > monthly then return {0, now, i, 5, monthly, month, cost, -3} end
  end
  counts[i + 1] = {reqs, toks, inflight, day, month}
end
local out = {1, now}
local exp = now + ttl
for i = 0, n - 1 do
  local k, a = i * 10, 6 + i * 5
  local rpm, tpm, conc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if rpm > 0 or tpm > 0 then
    redis.call('ZADD', KEYS[k + 1], now, lease)
    redis.call('PEXPIRE', KEYS[k + 1], WINDOW + 1000)
    if tpm > 0 then
      redis.call('HSET', KEYS[k + 2], lease, ARGV[2])
      redis.call('INCRBY', KEYS[k + 3], ARGV[2])
      redis.call('PEXPIRE', KEYS[k + 2], WINDOW + 1000)
      redis.call('PEXPIRE', KEYS[k + 3], WINDOW + 1000)
    end
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[k + 4], exp, lease)
    redis.call('PEXPIRE', KEYS[k + 4], ttl * 2)
  end
  if daily > 0 or monthly > 0 then
    redis.call('ZADD', KEYS[k + 5], exp, lease)
    redis.call('HSET', KEYS[k + 6], lease, ARGV[3])
    redis.call('INCRBY', KEYS[k + 7], ARGV[3])
    for j = 5, 7 do redis.call('PEXPIRE', KEYS[k + j], 86400000) end
  end
  for _, v in ipairs(counts[i + 1]) do out[#out + 1] = v end
end
return out
"#;

/// KEYS: 10 per scope. ARGV: lease, tokens, cost, scopes, then tpm concurrency budget flags
/// ("1"/"0") per scope. Returns how many scopes were charged the cost.
const SETTLE: &str = r#"
local lease, tokens, cost, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local charged = 0
for i = 0, n - 1 do
  local k, a = i * 10, 5 + i * 3
  if ARGV[a] == '1' then
    local old = redis.call('HGET', KEYS[k + 2], lease)
    if old then
      redis.call('HSET', KEYS[k + 2], lease, ARGV[2])
      redis.call('INCRBY', KEYS[k + 3], int(tokens - tonumber(old)))
    end
  end
  if ARGV[a + 1] == '1' then redis.call('ZREM', KEYS[k + 4], lease) end
  if ARGV[a + 2] == '1' then
    local charge = redis.call('ZREM', KEYS[k + 5], lease)
    if charge == 1 then
      redis.call('DECRBY', KEYS[k + 7], int(num(redis.call('HGET', KEYS[k + 6], lease))))
      redis.call('HDEL', KEYS[k + 6], lease)
    else
      charge = redis.call('ZREM', KEYS[k + 8], lease)
    end
    if charge == 1 and cost > 0 then
      redis.call('INCRBY', KEYS[k + 9], ARGV[3])
      redis.call('PEXPIRE', KEYS[k + 9], 3 * 86400000)
      redis.call('INCRBY', KEYS[k + 10], ARGV[3])
      redis.call('PEXPIRE', KEYS[k + 10], 35 * 86400000)
      charged = charged + 1
    end
  end
end
return charged
"#;

/// KEYS: the lease's concurrency sets, then its reservation sets. ARGV: lease, ttl ms, number of
/// concurrency sets. Extends the lease's expiry where it still is.
const REFRESH: &str = r#"
local exp = now_ms() + tonumber(ARGV[2])
local nc = tonumber(ARGV[3])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', exp, ARGV[1])
  if i <= nc then redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2]) * 2) end
end
return 1
"#;

/// KEYS: the proxies set. ARGV: proxy id, ttl ms. Returns the proxies seen within the ttl.
const FLEET: &str = r#"
local now = now_ms()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return redis.call('ZCARD', KEYS[1])
"#;

/// KEYS: 10 of one scope. ARGV: tpm flag. Returns {requests, tokens, window clear ms, in flight,
/// reserved, day settled, month settled}.
const READ: &str = r#"
local now = now_ms()
expire_window(KEYS[1], KEYS[2], KEYS[3], now, ARGV[1] == '1')
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
expire_reservations(KEYS[5], KEYS[6], KEYS[7], KEYS[8], now)
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
local clear = 0
if #last == 2 then clear = tonumber(last[2]) + WINDOW end
return {redis.call('ZCARD', KEYS[1]), num(redis.call('GET', KEYS[3])), clear,
  redis.call('ZCARD', KEYS[4]), num(redis.call('GET', KEYS[7])),
  num(redis.call('GET', KEYS[9])), num(redis.call('GET', KEYS[10]))}
"#;

/// KEYS: day and month spend. ARGV: micro-dollars.
const ADD_SPEND: &str = r#"
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 3 * 86400000)
redis.call('INCRBY', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], 35 * 86400000)
return 1
"#;

/// KEYS: day and month spend. ARGV: at least this much for each.
const RAISE_SPEND: &str = r#"
if num(redis.call('GET', KEYS[1])) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', 3 * 86400000)
end
if num(redis.call('GET', KEYS[2])) < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', 35 * 86400000)
end
return 1
"#;

const PROXIES_KEY: &str = "flex:lim:proxies";

/// The 10 keys of a scope, for the day and month given.
pub fn scope_keys(s: &ScopeLimits, day: &str, month: &str) -> [String; 10] {
    let base = match &s.scope.key_id {
        None => format!("flex:lim:{{{}}}:o", s.scope.org_id),
        Some(k) => format!("flex:lim:{{{}}}:k:{k}", s.scope.org_id),
    };
    [
        format!("{base}:w"),
        format!("{base}:wt"),
        format!("{base}:ws"),
        format!("{base}:c"),
        format!("{base}:r"),
        format!("{base}:ra"),
        format!("{base}:rs"),
        format!("{base}:x"),
        format!("{base}:d:{day}"),
        format!("{base}:m:{month}"),
    ]
}

struct Scripts {
    admit: Script,
    settle: Script,
    refresh: Script,
    fleet: Script,
    read: Script,
    add_spend: Script,
    raise_spend: Script,
}

/// The Redis limiter (see the module docs).
pub struct RedisLimiter {
    conn: ConnectionManager,
    scripts: Arc<Scripts>,
    /// How long a lease lives without a refresh.
    lease_ttl: Duration,
    /// Bound on every call.
    timeout: Duration,
}

fn unavailable(e: impl std::fmt::Display) -> LimiterError {
    LimiterError::Unavailable(e.to_string())
}

impl RedisLimiter {
    /// A limiter on `url` (`redis://[:PASSWORD@]HOST:PORT[/DB]`). Connects lazily: Redis may be
    /// down at start (admissions then follow the fail mode until it is up).
    pub fn new(url: &str, timeout: Duration, lease_ttl: Duration) -> Result<Self, String> {
        let client = Client::open(url).map_err(|e| {
            format!("invalid --redis-url: {e}; expected e.g. redis://127.0.0.1:6379 (or redis://:PASSWORD@HOST:6379/0)")
        })?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| format!("cannot set up the Redis connection for --redis-url: {e}"))?;
        let common = |body: &str| Script::new(&format!("{COMMON}\n{body}"));
        Ok(Self {
            conn,
            scripts: Arc::new(Scripts {
                admit: common(ADMIT),
                settle: common(SETTLE),
                refresh: common(REFRESH),
                fleet: common(FLEET),
                read: common(READ),
                add_spend: common(ADD_SPEND),
                raise_spend: common(RAISE_SPEND),
            }),
            lease_ttl,
            timeout,
        })
    }

    async fn bounded<T>(
        &self,
        f: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LimiterError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(LimiterError::Timeout(e.to_string())),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(LimiterError::Timeout(format!(
                "no answer from Redis within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    async fn admit_inner(&self, d: &Demand) -> Result<Decision, LimiterError> {
        let mut inv = self.scripts.admit.prepare_invoke();
        for s in &d.scopes {
            for k in scope_keys(s, &d.day, &d.month) {
                inv.key(k);
            }
        }
        inv.arg(&d.lease)
            .arg(d.tokens)
            .arg(d.cost_micros.max(0))
            .arg(u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(d.scopes.len());
        for s in &d.scopes {
            inv.arg(s.rpm)
                .arg(s.tpm)
                .arg(s.concurrency)
                .arg(s.daily_budget_micros.max(0))
                .arg(s.monthly_budget_micros.max(0));
        }
        let mut conn = self.conn.clone();
        let out: Vec<i64> = self.bounded(inv.invoke_async(&mut conn)).await?;
        parse_admit(&out, d.scopes.len())
    }
}

fn at(v: &[i64], i: usize) -> Result<i64, LimiterError> {
    v.get(i).copied().ok_or_else(|| {
        LimiterError::Unavailable(format!(
            "unexpected reply from the admission script ({} values)",
            v.len()
        ))
    })
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn parse_admit(out: &[i64], scopes: usize) -> Result<Decision, LimiterError> {
    let now_ms = u(at(out, 1)?);
    if at(out, 0)? == 1 {
        let mut counts = Vec::with_capacity(scopes);
        for i in 0..scopes {
            let b = 2 + i * 5;
            counts.push(ScopeCount {
                requests: u(at(out, b)?),
                tokens: u(at(out, b + 1)?),
                in_flight: u(at(out, b + 2)?),
                day_micros: at(out, b + 3)?,
                month_micros: at(out, b + 4)?,
            });
        }
        return Ok(Decision::Granted(Granted { now_ms, counts }));
    }
    let kind = LimitKind::from_code(at(out, 3)?).ok_or_else(|| {
        LimiterError::Unavailable("the admission script named an unknown limit".into())
    })?;
    let retry = at(out, 7)?;
    Ok(Decision::Refused(Refusal {
        now_ms,
        scope: usize::try_from(at(out, 2)?).unwrap_or(0),
        kind,
        limit: at(out, 4)?,
        used: at(out, 5)?,
        requested: at(out, 6)?,
        retry_after_ms: (retry >= 0).then(|| u(retry)),
    }))
}

impl Limiter for RedisLimiter {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn shared(&self) -> bool {
        true
    }

    fn admit<'a>(&'a self, d: &'a Demand) -> BoxFuture<'a, Result<Decision, LimiterError>> {
        Box::pin(self.admit_inner(d))
    }

    fn settle<'a>(&'a self, s: &'a Settlement) -> BoxFuture<'a, Result<(), LimiterError>> {
        Box::pin(async move {
            let mut inv = self.scripts.settle.prepare_invoke();
            for sl in &s.lease.scopes {
                for k in scope_keys(sl, &s.lease.day, &s.lease.month) {
                    inv.key(k);
                }
            }
            inv.arg(&s.lease.lease)
                .arg(s.tokens)
                .arg(s.cost_micros.max(0))
                .arg(s.lease.scopes.len());
            let flag = |b: bool| if b { "1" } else { "0" };
            for sl in &s.lease.scopes {
                inv.arg(flag(sl.tpm > 0))
                    .arg(flag(sl.concurrency > 0))
                    .arg(flag(sl.has_budget()));
            }
            let mut conn = self.conn.clone();
            let _charged: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
            Ok(())
        })
    }

    fn refresh<'a>(
        &'a self,
        leases: &'a [Arc<LeaseRef>],
        proxy_id: &'a str,
    ) -> BoxFuture<'a, Result<u64, LimiterError>> {
        Box::pin(async move {
            let ttl = u64::try_from(self.lease_ttl.as_millis()).unwrap_or(u64::MAX);
            // One script per lease, sent back to back on the multiplexed connection.
            let calls = leases.iter().filter_map(|l| {
                let mut conc = Vec::new();
                let mut money = Vec::new();
                for s in &l.scopes {
                    let keys = scope_keys(s, &l.day, &l.month);
                    if s.concurrency > 0 {
                        conc.push(keys[3].clone());
                    }
                    if s.has_budget() {
                        money.push(keys[4].clone());
                    }
                }
                if conc.is_empty() && money.is_empty() {
                    return None;
                }
                let mut inv = self.scripts.refresh.prepare_invoke();
                let nc = conc.len();
                for k in conc.into_iter().chain(money) {
                    inv.key(k);
                }
                inv.arg(&l.lease).arg(ttl).arg(nc);
                let mut conn = self.conn.clone();
                Some(async move { inv.invoke_async::<i64>(&mut conn).await })
            });
            let results = self
                .bounded(async {
                    let all = futures_util::future::join_all(calls).await;
                    all.into_iter().collect::<redis::RedisResult<Vec<i64>>>()
                })
                .await;
            results?;
            let mut conn = self.conn.clone();
            let fleet: i64 = self
                .bounded(
                    self.scripts
                        .fleet
                        .key(PROXIES_KEY)
                        .arg(proxy_id)
                        .arg(ttl)
                        .invoke_async(&mut conn),
                )
                .await?;
            Ok(u(fleet).max(1))
        })
    }

    fn read<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
    ) -> BoxFuture<'a, Result<Reading, LimiterError>> {
        Box::pin(async move {
            let mut inv = self.scripts.read.prepare_invoke();
            for k in scope_keys(s, day, month) {
                inv.key(k);
            }
            inv.arg(if s.tpm > 0 { "1" } else { "0" });
            let mut conn = self.conn.clone();
            let v: Vec<i64> = self.bounded(inv.invoke_async(&mut conn)).await?;
            Ok(Reading {
                requests: u(at(&v, 0)?),
                tokens: u(at(&v, 1)?),
                window_clear_at_ms: u(at(&v, 2)?),
                in_flight: u(at(&v, 3)?),
                reserved_micros: at(&v, 4)?,
                day_settled_micros: at(&v, 5)?,
                month_settled_micros: at(&v, 6)?,
            })
        })
    }

    fn add_spend<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
        micros: i64,
    ) -> BoxFuture<'a, Result<(), LimiterError>> {
        Box::pin(async move {
            let keys = scope_keys(s, day, month);
            let mut conn = self.conn.clone();
            let _: i64 = self
                .bounded(
                    self.scripts
                        .add_spend
                        .key(&keys[8])
                        .key(&keys[9])
                        .arg(micros)
                        .invoke_async(&mut conn),
                )
                .await?;
            Ok(())
        })
    }

    fn raise_spend<'a>(
        &'a self,
        s: &'a ScopeLimits,
        day: &'a str,
        month: &'a str,
        day_micros: i64,
        month_micros: i64,
    ) -> BoxFuture<'a, Result<(), LimiterError>> {
        Box::pin(async move {
            let keys = scope_keys(s, day, month);
            let mut conn = self.conn.clone();
            let _: i64 = self
                .bounded(
                    self.scripts
                        .raise_spend
                        .key(&keys[8])
                        .key(&keys[9])
                        .arg(day_micros.max(0))
                        .arg(month_micros.max(0))
                        .invoke_async(&mut conn),
                )
                .await?;
            Ok(())
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), LimiterError>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let pong: String = self
                .bounded(redis::cmd("PING").query_async(&mut conn))
                .await?;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(LimiterError::Unavailable(format!(
                    "Redis answered PING with {pong:?}"
                )))
            }
        })
    }
}
