//! Redis state store: idempotency claims and outcomes shared by every replica.
//!
//! One key per idempotency key, `{prefix}idem:{key}`, holding either `C:<owner>` (a claim, with
//! the lease as its TTL) or `D:<outcome>` (a finished job, with the retention TTL). Claim,
//! renew and release are Lua scripts, so check-and-set is atomic: two replicas can never both
//! hold a live claim, and a crashed worker's claim simply expires and can be taken over.
//! One multiplexed connection (redis' ConnectionManager, which reconnects by itself); every
//! command has a response timeout, so an outage surfaces as [`StateError::Unavailable`] instead
//! of a hang.

use std::time::Duration;

use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::{Claim, ClaimToken, Renewal, StateError};
use crate::config::RedisAccess;

// The claim as a script, for servers before Redis 7.0 (which cannot combine `SET`'s `NX` and
// `GET`); on 7.0 and later one native `SET key C:<owner> NX PX <lease> GET` does the same, at a
// fraction of the server's CPU. 1: claimed, 2: finished (the outcome), 3: another's claim.
const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'C:' .. ARGV[1], 'PX', ARGV[2])
  return {1, ''}
end
if string.sub(v, 1, 2) == 'D:' then
  return {2, string.sub(v, 3)}
end
return {3, ''}
";

// Renews our claim; a key that vanished (Redis restarted without persistence) is claimed again.
// 1: held, 2: finished (a `D:` outcome), 0: another worker's claim.
const RENEW: &str = r"
local v = redis.call('GET', KEYS[1])
if v == 'C:' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], 'C:' .. ARGV[1], 'PX', ARGV[2])
  return 1
end
if string.sub(v, 1, 2) == 'D:' then
  return 2
end
return 0
";

// Records the outcome only for the claim's holder (or a key that vanished): a worker whose lease
// was taken over never overwrites the new holder's claim or outcome. 1: stored, 0: not ours.
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == 'C:' .. ARGV[1] or not v then
  redis.call('SET', KEYS[1], 'D:' .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

// Replaces a finished key's outcome, keeping its TTL; a claim or a missing key is left alone.
const REPLACE: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 2) == 'D:' then
  redis.call('SET', KEYS[1], 'D:' .. ARGV[1], 'KEEPTTL')
  return 1
end
return 0
";

// Forgets a finished key only while it still holds the given outcome.
const FORGET_OUTCOME: &str = r"
if redis.call('GET', KEYS[1]) == 'D:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'C:' .. ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    prefix: String,
    /// Claims with one native `SET ... NX GET` (Redis 7.0+); cleared when the server refuses
    /// that as a syntax error, and claims use the [`CLAIM`] script from then on (until the
    /// process restarts, so a server upgraded to 7.0 meanwhile gets the command after one).
    native_claim: std::sync::Arc<std::sync::atomic::AtomicBool>,
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
    gcra: Script,
    book: Script,
    spend: Script,
}

/// The server refused `SET`'s `NX` with `GET`, which Redis accepts from 7.0.
fn before_7_0(e: &redis::RedisError) -> bool {
    matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
    ) && e.to_string().contains("syntax error")
}

fn unavailable(e: redis::RedisError) -> StateError {
    StateError::Unavailable(e.to_string())
}

/// One connection: to a single Redis (reconnecting by itself), or to a cluster (each command
/// routed by its keys' hash slot; every script here keeps its keys in one slot).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    Sentinel(SentinelConn),
}

/// The master the sentinels name, reconnected (by asking them again) after any failed command:
/// a failover moves the master, and the old one, if it comes back, is a read-only replica.
#[derive(Clone)]
struct SentinelConn {
    client: std::sync::Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
    /// The master's connection and its generation, so a failure seen on an old connection
    /// never discards a newer one.
    current: std::sync::Arc<std::sync::Mutex<(u64, Option<redis::aio::MultiplexedConnection>)>>,
    config: redis::AsyncConnectionConfig,
}

impl SentinelConn {
    fn new(
        url: &str,
        master: &str,
        access: &RedisAccess,
        timeout: Duration,
    ) -> Result<Self, StateError> {
        let mut node = redis::sentinel::SentinelNodeConnectionInfo::default();
        if let Some(password) = password(access)? {
            let mut info = redis::RedisConnectionInfo::default().set_password(password);
            if let Some(user) = &access.username {
                info = info.set_username(user);
            }
            node = node.set_redis_connection_info(info);
        }
        if access.tls_insecure {
            node = node.set_tls_mode(redis::TlsMode::Insecure);
        } else if access.tls.is_some() {
            node = node.set_tls_mode(redis::TlsMode::Secure);
        }
        let client = redis::sentinel::SentinelClient::build(
            nodes(url),
            master,
            Some(node),
            redis::sentinel::SentinelServerType::Master,
        )
        .map_err(unavailable)?;
        Ok(Self {
            client: std::sync::Arc::new(tokio::sync::Mutex::new(client)),
            current: Default::default(),
            config: redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
        })
    }

    /// The master's connection (and its generation), asking the sentinels when there is none;
    /// concurrent callers wait for one lookup instead of each making their own.
    async fn connection(&self) -> redis::RedisResult<(u64, redis::aio::MultiplexedConnection)> {
        if let (generation, Some(connection)) = self.snapshot() {
            return Ok((generation, connection));
        }
        let mut client = self.client.lock().await;
        if let (generation, Some(connection)) = self.snapshot() {
            return Ok((generation, connection));
        }
        let connection = client
            .get_async_connection_with_config(&self.config)
            .await?;
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current.0 += 1;
        current.1 = Some(connection.clone());
        Ok((current.0, connection))
    }

    fn snapshot(&self) -> (u64, Option<redis::aio::MultiplexedConnection>) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (current.0, current.1.clone())
    }

    /// Drops generation `generation`'s connection, if it is still the current one.
    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.0 == generation {
            current.1 = None;
        }
    }
}

/// Whether a command's answer means this is no longer the master to talk to: the connection
/// broke, or the server says it is a read-only replica or has lost its master.
fn stale_master<T>(answer: &redis::RedisResult<T>, values: &[&redis::Value]) -> bool {
    let demoted = |code: &str| matches!(code, "READONLY" | "MASTERDOWN" | "LOADING");
    match answer {
        Err(e) => e.code().is_none_or(demoted),
        Ok(_) => values
            .iter()
            .any(|v| matches!(v, redis::Value::ServerError(e) if demoted(e.code()))),
    }
}

/// Requests (a command, a script or a pipeline: one round trip each) this process has sent to
/// Redis, for the benchmark's round trips per job.
static ROUND_TRIPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Round trips to Redis so far (see [`ROUND_TRIPS`]).
pub fn round_trips() -> u64 {
    ROUND_TRIPS.load(std::sync::atomic::Ordering::Relaxed)
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Sentinel(s) => Box::pin(async move {
                let (generation, mut connection) = s.connection().await?;
                let answer = connection.req_packed_command(cmd).await;
                let values: Vec<&redis::Value> = answer.iter().collect();
                if stale_master(&answer, &values) {
                    s.forget(generation);
                }
                answer
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        ROUND_TRIPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Sentinel(s) => Box::pin(async move {
                let (generation, mut connection) = s.connection().await?;
                let answer = connection
                    .req_packed_commands(pipeline, offset, count)
                    .await;
                let values: Vec<&redis::Value> = answer.iter().flatten().collect();
                if stale_master(&answer, &values) {
                    s.forget(generation);
                }
                answer
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Sentinel(_) => 0,
        }
    }
}

/// A cluster connection from the comma-separated seed nodes in `url`.
async fn cluster_connection(
    url: &str,
    access: &RedisAccess,
    timeout: Duration,
) -> Result<redis::cluster_async::ClusterConnection, StateError> {
    let mut builder = redis::cluster::ClusterClientBuilder::new(nodes(url))
        .connection_timeout(timeout)
        .response_timeout(timeout)
        .retries(2);
    if let Some(password) = password(access)? {
        builder = builder.password(password);
        if let Some(user) = &access.username {
            builder = builder.username(user);
        }
    }
    if access.tls_insecure {
        builder = builder.tls(redis::TlsMode::Insecure);
    } else if let Some(tls) = &access.tls {
        builder = builder
            .tls(redis::TlsMode::Secure)
            .certs(tls_certificates(tls)?);
    }
    builder
        .build()
        .map_err(unavailable)?
        .get_async_connection()
        .await
        .map_err(unavailable)
}

/// The comma-separated nodes of a cluster's seed list or a sentinel list.
fn nodes(url: &str) -> Vec<String> {
    url.split(',').map(|u| u.trim().to_owned()).collect()
}

/// The ACL password from `access.password_env`, when one is configured.
fn password(access: &RedisAccess) -> Result<Option<String>, StateError> {
    access
        .password_env
        .as_deref()
        .map(|var| crate::config::secret_from_env("state.password_env", var))
        .transpose()
        .map_err(StateError::Unavailable)
}

/// The PEM material of `tls`, read from its files.
fn tls_certificates(tls: &crate::config::TlsFiles) -> Result<redis::TlsCertificates, StateError> {
    let read = |field: &str, path: &str| {
        std::fs::read(path)
            .map_err(|e| StateError::Unavailable(format!("{field}: cannot read {path}: {e}")))
    };
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|path| read("state.tls.ca_file", path))
        .transpose()?;
    let client_tls = match &tls.client {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read("state.tls.cert_file", cert)?,
            client_key: read("state.tls.key_file", key)?,
        }),
        None => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

/// What `connect_with` would reject before any network round trip: an unparsable URL or seed
/// list, a missing password variable, unreadable TLS files.
pub fn check(url: &str, access: &RedisAccess) -> Result<(), StateError> {
    use redis::IntoConnectionInfo as _;
    if access.cluster || access.sentinel_master.is_some() {
        for node in nodes(url) {
            node.as_str().into_connection_info().map_err(|e| {
                StateError::Unavailable(format!(
                    "state.url: `{}`: {e}",
                    crate::config::redact_url(&node)
                ))
            })?;
        }
        if let Some(tls) = &access.tls {
            tls_certificates(tls)?;
        }
        password(access)?;
        return Ok(());
    }
    client(url, access).map(|_| ())
}

/// The client for `url` with `access` applied; errors name the config field, never a secret.
fn client(url: &str, access: &RedisAccess) -> Result<redis::Client, StateError> {
    use redis::IntoConnectionInfo as _;
    let failed = |field: &str, what: String| StateError::Unavailable(format!("{field}: {what}"));
    let mut url = url.to_owned();
    if access.tls_insecure && !url.contains('#') {
        url.push_str("#insecure");
    }
    let mut info = url
        .as_str()
        .into_connection_info()
        .map_err(|e| failed("state.url", e.to_string()))?;
    if let Some(password) = password(access)? {
        let mut settings = info.redis_settings().clone().set_password(password);
        if let Some(user) = &access.username {
            settings = settings.set_username(user);
        }
        info = info.set_redis_settings(settings);
    }
    let Some(tls) = &access.tls else {
        return redis::Client::open(info).map_err(unavailable);
    };
    redis::Client::build_with_tls(info, tls_certificates(tls)?).map_err(unavailable)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisStore {
    /// Connects once; fails (naming the URL's host, not its password) when Redis is unreachable.
    pub async fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StateError> {
        Self::connect_with(url, prefix, timeout, &RedisAccess::default()).await
    }

    /// [`Self::connect`] with an ACL user (password from the environment) and TLS files.
    pub async fn connect_with(
        url: &str,
        prefix: &str,
        timeout: Duration,
        access: &RedisAccess,
    ) -> Result<Self, StateError> {
        let conn = if access.cluster {
            Conn::Cluster(cluster_connection(url, access, timeout).await?)
        } else if let Some(master) = &access.sentinel_master {
            let sentinel = SentinelConn::new(url, master, access, timeout)?;
            // Fail at start-up, as for a single node, when the master cannot be reached.
            sentinel.connection().await.map_err(unavailable)?;
            Conn::Sentinel(sentinel)
        } else {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_secs(2));
            let manager = client(url, access)?
                .get_connection_manager_with_config(config)
                .await
                .map_err(unavailable)?;
            Conn::Single(manager)
        };
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            native_claim: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            claim: Script::new(CLAIM),
            renew: Script::new(RENEW),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            gcra: Script::new(super::counters::GCRA),
            book: Script::new(super::counters::BOOK),
            spend: Script::new(super::counters::SPEND),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}idem:{key}", self.prefix)
    }

    pub async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StateError> {
        use std::sync::atomic::Ordering::Relaxed;
        let owner = ClaimToken::random();
        let mut conn = self.conn.clone();
        if self.native_claim.load(Relaxed) {
            // Sets the claim only where the key is absent, and answers what it held instead.
            let mine = format!("C:{}", owner.0);
            let held: Result<redis::Value, _> = redis::cmd("SET")
                .arg(self.key(key))
                .arg(&mine)
                .arg("NX")
                .arg("PX")
                .arg(millis(lease))
                .arg("GET")
                .query_async(&mut conn)
                .await;
            match held {
                // Nothing was there (a server that leaves out GET's answer says OK): ours now.
                Ok(redis::Value::Nil | redis::Value::Okay) => return Ok(Claim::Acquired(owner)),
                Ok(redis::Value::BulkString(v)) if v.starts_with(b"D:") => {
                    return Ok(Claim::Done(Bytes::from(v).slice(2..)))
                }
                // Our own claim: the connection sent the command again after it had landed.
                Ok(redis::Value::BulkString(v)) if v == mine.as_bytes() => {
                    return Ok(Claim::Acquired(owner))
                }
                Ok(redis::Value::BulkString(_)) => return Ok(Claim::Busy),
                Ok(other) => {
                    return Err(StateError::Unavailable(format!(
                        "unexpected answer to SET NX GET: {other:?}"
                    )))
                }
                Err(e) if before_7_0(&e) => {
                    self.native_claim.store(false, Relaxed);
                    tracing::info!("this Redis cannot combine SET NX and GET (before 7.0); claims use a script");
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        let (code, stored): (i64, Vec<u8>) = self
            .claim
            .key(self.key(key))
            .arg(&owner.0)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(match code {
            1 => Claim::Acquired(owner),
            2 => Claim::Done(Bytes::from(stored)),
            _ => Claim::Busy,
        })
    }

    pub async fn renew(
        &self,
        key: &str,
        token: &ClaimToken,
        lease: Duration,
    ) -> Result<Renewal, StateError> {
        let mut conn = self.conn.clone();
        let code: i64 = self
            .renew
            .key(self.key(key))
            .arg(&token.0)
            .arg(millis(lease))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(match code {
            1 => Renewal::Held,
            2 => Renewal::Finished,
            _ => Renewal::Lost,
        })
    }

    pub async fn complete(
        &self,
        key: &str,
        token: &ClaimToken,
        outcome: Bytes,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        let stored: i64 = self
            .complete
            .key(self.key(key))
            .arg(&token.0)
            .arg(outcome.as_ref())
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(stored == 1)
    }

    pub async fn peek(&self, key: &str) -> Result<super::Peek, StateError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(self.key(key))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(match value {
            None => super::Peek::Absent,
            Some(v) if v.starts_with(b"D:") => super::Peek::Done(Bytes::from(v).slice(2..)),
            Some(_) => super::Peek::Claimed,
        })
    }

    pub async fn forget_outcome(&self, key: &str, outcome: &[u8]) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        let forgotten: i64 = Script::new(FORGET_OUTCOME)
            .key(self.key(key))
            .arg(outcome)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(forgotten == 1)
    }

    pub async fn replace_outcome(&self, key: &str, outcome: Bytes) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        let replaced: i64 = Script::new(REPLACE)
            .key(self.key(key))
            .arg(outcome.as_ref())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(replaced == 1)
    }

    pub async fn release(&self, key: &str, token: &ClaimToken) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(self.key(key))
            .arg(&token.0)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn cache_get(&self, key: &str) -> Result<Option<Bytes>, StateError> {
        let mut conn = self.conn.clone();
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(format!("{}cache:{key}", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(value.map(Bytes::from))
    }

    pub async fn cache_put(
        &self,
        key: &str,
        value: Bytes,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}cache:{key}", self.prefix))
            .arg(value.as_ref())
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// [`super::counters::MemoryCounters::book`] for each of `jobs` (ticket, park after), in
    /// one round trip. Every key carries the caller's hash tag.
    pub async fn book(
        &self,
        key: &str,
        jobs: &[(&str, Option<Duration>)],
        rate: super::Rate,
    ) -> Result<Vec<super::Booking>, StateError> {
        let mut conn = self.conn.clone();
        let mut script = self.book.key(format!("{}rate:{key}", self.prefix));
        for (ticket, _) in jobs {
            script.key(format!("{}ticket:{ticket}", self.prefix));
        }
        script
            .arg(rate.interval.as_secs_f64() * 1000.0)
            .arg(rate.tolerance.as_secs_f64() * 1000.0)
            .arg(millis(super::counters::TICKET_GRACE));
        for (_, park_after) in jobs {
            script.arg(park_after.map_or(-1, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
        }
        let flat: Vec<u64> = script.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(flat
            .chunks_exact(2)
            .map(|pair| {
                let wait = Duration::from_millis(pair[1]);
                match pair[0] {
                    0 => super::Booking::Now,
                    2 => super::Booking::Parked(wait),
                    3 => super::Booking::Ticket(wait),
                    _ => super::Booking::After(wait),
                }
            })
            .collect())
    }

    /// GCRA throttle (`check`) or adjustment; the wait when throttled.
    pub async fn gcra(
        &self,
        key: &str,
        cost: f64,
        rate: super::Rate,
        check: bool,
    ) -> Result<Option<Duration>, StateError> {
        let mut conn = self.conn.clone();
        let wait_ms: i64 = self
            .gcra
            .key(format!("{}rate:{key}", self.prefix))
            .arg(cost)
            .arg(rate.interval.as_secs_f64() * 1000.0)
            .arg(rate.tolerance.as_secs_f64() * 1000.0)
            .arg(if check { "t" } else { "a" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(u64::try_from(wait_ms).ok().map(Duration::from_millis))
    }

    pub async fn spend(
        &self,
        keys: &super::BudgetKeys,
        amount: f64,
        check: bool,
    ) -> Result<super::Spend, StateError> {
        let mut conn = self.conn.clone();
        let (allowed, day, month): (i64, String, String) = self
            .spend
            .key(format!("{}budget:{}", self.prefix, keys.day))
            .key(format!("{}budget:{}", self.prefix, keys.month))
            .arg(amount)
            .arg(keys.day_limit.unwrap_or(-1.0))
            .arg(keys.month_limit.unwrap_or(-1.0))
            .arg(millis(super::counters::DAY_TTL))
            .arg(millis(super::counters::MONTH_TTL))
            .arg(if check { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(super::Spend {
            allowed: allowed == 1,
            day: day.parse().unwrap_or(0.0),
            month: month.parse().unwrap_or(0.0),
        })
    }

    pub async fn ping(&self) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }
}

// Pending reviews: the record, the deadline index and the per-tenant count, under one hash tag
// so each script's keys share a Redis Cluster slot. Opening is idempotent (a redelivered job
// opens the same review once); forgetting removes all three.
const REVIEW_OPEN: &str = r"
local new = redis.call('EXISTS', KEYS[1]) == 0
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if new then
  redis.call('HINCRBY', KEYS[3], ARGV[4], 1)
  return 1
end
return 0
";

const REVIEW_FORGET: &str = r"
if redis.call('DEL', KEYS[1]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[2], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[2])
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
";

impl RedisStore {
    fn review_keys(&self, id: &str) -> [String; 3] {
        let p = &self.prefix;
        [
            format!("{p}{{reviews}}:rec:{id}"),
            format!("{p}{{reviews}}:due"),
            format!("{p}{{reviews}}:pending"),
        ]
    }

    pub async fn review_open(
        &self,
        id: &str,
        tenant: &str,
        deadline_ms: i64,
        record: Bytes,
    ) -> Result<bool, StateError> {
        let mut conn = self.conn.clone();
        let opened: i64 = Script::new(REVIEW_OPEN)
            .key(self.review_keys(id).as_slice())
            .arg(id)
            .arg(record.as_ref())
            .arg(deadline_ms)
            .arg(tenant)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(opened == 1)
    }

    pub async fn review_get(&self, id: &str) -> Result<Option<Bytes>, StateError> {
        let mut conn = self.conn.clone();
        let [record, ..] = self.review_keys(id);
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(record)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(value.map(Bytes::from))
    }

    pub async fn review_forget(&self, id: &str, tenant: &str) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(REVIEW_FORGET)
            .key(self.review_keys(id).as_slice())
            .arg(id)
            .arg(tenant)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Up to `limit` review ids ordered by deadline, only those due by `until_ms` if given.
    pub async fn reviews_by_deadline(
        &self,
        until_ms: Option<i64>,
        limit: usize,
    ) -> Result<Vec<String>, StateError> {
        let mut conn = self.conn.clone();
        let [_, due, _] = self.review_keys("");
        let until = until_ms.map_or_else(|| "+inf".to_owned(), |t| t.to_string());
        redis::cmd("ZRANGEBYSCORE")
            .arg(due)
            .arg("-inf")
            .arg(until)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    /// Pending reviews by tenant.
    pub async fn review_counts(&self) -> Result<Vec<(String, u64)>, StateError> {
        let mut conn = self.conn.clone();
        let [_, _, pending] = self.review_keys("");
        let counts: std::collections::HashMap<String, i64> = redis::cmd("HGETALL")
            .arg(pending)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(counts
            .into_iter()
            .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
            .collect())
    }
}

// A semantic-cache index: a sorted set of entries scored by when they were added, trimmed to
// the last `ttl` and the newest `max_entries`, expiring whole once idle for `ttl`.
const INDEX_ADD: &str = r"
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -(tonumber(ARGV[4]) + 1))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

impl RedisStore {
    fn index_key(&self, index: &str) -> String {
        format!("{}sem:{{{index}}}", self.prefix)
    }

    pub async fn index_add(
        &self,
        index: &str,
        score_ms: i64,
        entry: Bytes,
        max_entries: usize,
        ttl: Duration,
    ) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let _: i64 = Script::new(INDEX_ADD)
            .key(self.index_key(index))
            .arg(score_ms)
            .arg(entry.as_ref())
            .arg(score_ms.saturating_sub(ttl_ms))
            .arg(max_entries.max(1))
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn index_since(
        &self,
        index: &str,
        from_ms: i64,
        limit: usize,
    ) -> Result<Vec<(Bytes, i64)>, StateError> {
        let mut conn = self.conn.clone();
        let found: Vec<(Vec<u8>, f64)> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.index_key(index))
            .arg(from_ms)
            .arg("+inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(found
            .into_iter()
            .map(|(entry, score)| (Bytes::from(entry), score as i64))
            .collect())
    }
}

// Jobs waiting for a provider batch. A job's parking record and its answers share the job's
// hash tag; the request queues, the submissions under way and the open batches share one.
const BATCH_TAKE: &str = r"
local items = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #items == 0 then
  return items
end
redis.call('LTRIM', KEYS[1], #items, -1)
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode({queue = ARGV[4], at = tonumber(ARGV[3]), items = items}))
return items
";

const BATCH_OPENED: &str = r"
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
";

const BATCH_REQUEUE: &str = r"
if redis.call('HDEL', KEYS[1], ARGV[1]) == 1 then
  for i = 2, #ARGV do
    redis.call('RPUSH', KEYS[2], ARGV[i])
  end
end
return 1
";

// Kept even before the job's record is written (a batch quicker than its parking).
const BATCH_ANSWER: &str = r"
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
";

/// How long a parked job's record lives: longer than any provider's batch window (24 h).
const PARK_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

impl RedisStore {
    fn parked_keys(&self, job_key: &str) -> [String; 2] {
        let p = &self.prefix;
        [
            format!("{p}bj:{{{job_key}}}"),
            format!("{p}bja:{{{job_key}}}"),
        ]
    }

    fn batch_key(&self, what: &str) -> String {
        format!("{}{{batches}}:{what}", self.prefix)
    }

    pub async fn batch_park(&self, job_key: &str, record: Bytes) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let [parked, _] = self.parked_keys(job_key);
        redis::cmd("SET")
            .arg(parked)
            .arg(record.as_ref())
            .arg("PX")
            .arg(PARK_TTL_MS)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    pub async fn batch_parked(&self, job_key: &str) -> Result<Option<Bytes>, StateError> {
        let mut conn = self.conn.clone();
        let [parked, _] = self.parked_keys(job_key);
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(parked)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(value.map(Bytes::from))
    }

    pub async fn batch_unpark(&self, job_key: &str) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let keys = self.parked_keys(job_key);
        redis::cmd("DEL")
            .arg(keys.as_slice())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }

    pub async fn batch_answer(
        &self,
        job_key: &str,
        key: &str,
        answer: Bytes,
    ) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(BATCH_ANSWER)
            .key(self.parked_keys(job_key).as_slice())
            .arg(key)
            .arg(answer.as_ref())
            .arg(PARK_TTL_MS)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn batch_answers(&self, job_key: &str) -> Result<Vec<(String, Bytes)>, StateError> {
        let mut conn = self.conn.clone();
        let [_, answers] = self.parked_keys(job_key);
        let found: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(answers)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(found
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect())
    }

    pub async fn batch_queued(&self, queue: &str) -> Result<u64, StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("LLEN")
            .arg(self.batch_key(&format!("q:{queue}")))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    pub async fn batch_enqueue(&self, queue: &str, items: Vec<Bytes>) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("RPUSH");
        cmd.arg(self.batch_key(&format!("q:{queue}")));
        for item in &items {
            cmd.arg(item.as_ref());
        }
        cmd.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    pub async fn batch_take(
        &self,
        queue: &str,
        max: usize,
        submission: &str,
        at_ms: i64,
    ) -> Result<Vec<Bytes>, StateError> {
        let mut conn = self.conn.clone();
        let taken: Vec<Vec<u8>> = Script::new(BATCH_TAKE)
            .key(self.batch_key(&format!("q:{queue}")))
            .key(self.batch_key("submitting"))
            .arg(max.max(1))
            .arg(submission)
            .arg(at_ms)
            .arg(queue)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(taken.into_iter().map(Bytes::from).collect())
    }

    pub async fn batch_opened(
        &self,
        submission: &str,
        batch: &str,
        meta: Bytes,
    ) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let _: i64 = Script::new(BATCH_OPENED)
            .key(self.batch_key("submitting"))
            .key(self.batch_key("open"))
            .arg(submission)
            .arg(batch)
            .arg(meta.as_ref())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub async fn batch_requeue(
        &self,
        submission: &str,
        queue: &str,
        items: Vec<Bytes>,
    ) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        let requeue = Script::new(BATCH_REQUEUE);
        let mut script = requeue.prepare_invoke();
        script
            .key(self.batch_key("submitting"))
            .key(self.batch_key(&format!("q:{queue}")))
            .arg(submission);
        for item in &items {
            script.arg(item.as_ref());
        }
        let _: i64 = script.invoke_async(&mut conn).await.map_err(unavailable)?;
        Ok(())
    }

    pub async fn batch_hash(&self, what: &str) -> Result<Vec<(String, Bytes)>, StateError> {
        let mut conn = self.conn.clone();
        let found: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(self.batch_key(what))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(found
            .into_iter()
            .map(|(k, v)| (k, Bytes::from(v)))
            .collect())
    }

    pub async fn batch_close(&self, batch: &str) -> Result<(), StateError> {
        let mut conn = self.conn.clone();
        redis::cmd("HDEL")
            .arg(self.batch_key("open"))
            .arg(batch)
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn redis_url() -> String {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    /// The same claims through `SET NX GET` and through the script a server before 7.0 gets:
    /// a free key is claimed, a claimed one is busy, a finished one answers its outcome.
    #[tokio::test]
    async fn a_claim_reads_the_same_with_set_nx_get_and_with_the_script() {
        let prefix = format!("ut{:x}:", rand::random::<u64>());
        let store = RedisStore::connect(&redis_url(), &prefix, Duration::from_secs(2))
            .await
            .expect("Redis must be running at REDIS_URL (default redis://127.0.0.1:6379)");
        // What a server refusing an option combination answers (7.0 refuses NX with XX the
        // way 6.2 refuses NX with GET) is what the fallback recognises.
        let mut conn = store.conn.clone();
        let refused: Result<(), _> = redis::cmd("SET")
            .arg(format!("{prefix}x"))
            .arg("v")
            .arg("NX")
            .arg("XX")
            .query_async(&mut conn)
            .await;
        assert!(before_7_0(
            &refused.expect_err("NX with XX is a syntax error")
        ));
        let lease = Duration::from_secs(10);
        for native in [true, false] {
            store
                .native_claim
                .store(native, std::sync::atomic::Ordering::Relaxed);
            let key = format!("acme/k-{native}");
            let Claim::Acquired(owner) = store.claim(&key, lease).await.unwrap() else {
                panic!("a free key is claimed (native: {native})");
            };
            assert!(
                matches!(store.claim(&key, lease).await.unwrap(), Claim::Busy),
                "a claimed key is busy (native: {native})"
            );
            let outcome = Bytes::from_static(b"{\"kind\":\"result\"}");
            assert!(store
                .complete(&key, &owner, outcome.clone(), lease)
                .await
                .unwrap());
            match store.claim(&key, lease).await.unwrap() {
                Claim::Done(stored) => assert_eq!(stored, outcome, "native: {native}"),
                _ => panic!("a finished key answers its outcome (native: {native})"),
            }
            assert_eq!(
                store
                    .native_claim
                    .load(std::sync::atomic::Ordering::Relaxed),
                native,
                "this server takes SET NX GET, so nothing falls back"
            );
        }
    }

    #[test]
    fn only_a_syntax_error_from_the_server_means_a_server_before_7_0() {
        let server = |detail: &str| {
            redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "An error was signalled by the server",
                detail.to_owned(),
            ))
        };
        assert!(before_7_0(&server("syntax error")));
        assert!(!before_7_0(&server(
            "WRONGTYPE Operation against a key holding the wrong kind of value"
        )));
        let io = redis::RedisError::from(std::io::Error::other("syntax error"));
        assert!(!before_7_0(&io));
    }
}
