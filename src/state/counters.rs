//! Shared counters for admission: GCRA rate limiters and spend budgets.
//!
//! A rate limiter is one number per key, its theoretical arrival time (TAT). A call of `cost`
//! units is admitted while the debt `TAT - now` is at most the tolerance, and moves the TAT
//! `cost * interval` further. Over any long window the admitted units therefore average
//! `1 / interval` per unit of time, however many replicas share the key; the tolerance is the
//! burst allowed on top. Reconciling an estimate moves the TAT by the difference (never below
//! now). Redis runs the same arithmetic in Lua, with Redis' clock, so replicas agree.
//!
//! A budget is a pair of spend sums (the day's and the month's, keyed by date). Reserving checks
//! both and adds the amount atomically; settling adds the difference between actual and estimate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest interval per unit a limiter uses (one unit a day).
const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// A rate: `interval` per unit, with `tolerance` of burst.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub interval: Duration,
    pub tolerance: Duration,
}

impl Rate {
    /// `per_period` units per `period`, bursting up to `burst_period`'s worth.
    pub fn new(per_period: f64, period: Duration, burst_period: Duration) -> Self {
        // Bounded both ways, so a pathological limit (1e-300/s) cannot overflow the arithmetic.
        let interval = Duration::try_from_secs_f64(period.as_secs_f64() / per_period.max(1e-9))
            .unwrap_or(MAX_INTERVAL)
            .min(MAX_INTERVAL);
        Self {
            interval,
            tolerance: burst_period,
        }
    }
}

/// A job's place in its tenant's line, booked on a rate limiter (see [`MemoryCounters::book`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booking {
    /// Its slot is now.
    Now,
    /// It came back with the ticket it was parked with, this long ago: its slot is now.
    Ticket(Duration),
    /// Its slot comes after this wait; the job waits for it where it is.
    After(Duration),
    /// Its slot comes after this wait, too far off to hold the job meanwhile: a ticket is stored
    /// under the job's name, so it runs at once when it comes back (see `ticket`).
    Parked(Duration),
}

/// How long a parked job's ticket outlives its slot (a redelivery a little late still uses it).
pub const TICKET_GRACE: Duration = Duration::from_secs(120);

/// Reservation against a budget: whether it fitted and what is spent after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spend {
    pub allowed: bool,
    pub day: f64,
    pub month: f64,
}

/// The day and month keys of a budget and their limits.
#[derive(Debug, Clone)]
pub struct BudgetKeys {
    pub day: String,
    pub month: String,
    pub day_limit: Option<f64>,
    pub month_limit: Option<f64>,
}

/// Budget keys outlive their period by a margin, then expire.
pub const DAY_TTL: Duration = Duration::from_secs(2 * 86_400);
pub const MONTH_TTL: Duration = Duration::from_secs(32 * 86_400);

/// How many operations between sweeps of expired in-memory counters.
const SWEEP_EVERY: u64 = 4096;

#[derive(Default)]
struct Inner {
    /// Rate limiter TATs, as instants.
    tats: HashMap<String, Instant>,
    /// Budget sums with their expiry.
    sums: HashMap<String, (f64, Instant)>,
    /// Tickets of parked jobs: when each was parked, its slot and its expiry.
    tickets: HashMap<String, (Instant, Instant, Instant)>,
    ops: u64,
}

/// The in-process counters of embedded mode: same semantics as the Redis scripts.
#[derive(Clone, Default)]
pub struct MemoryCounters {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryCounters {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `None` when admitted; otherwise how long until the debt is back within tolerance.
    pub fn throttle(&self, key: &str, cost: f64, rate: Rate) -> Option<Duration> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now);
        let tat = inner.tats.get(key).copied().unwrap_or(now).max(now);
        let debt = tat - now;
        if debt > rate.tolerance {
            return Some(debt - rate.tolerance);
        }
        inner
            .tats
            .insert(key.to_owned(), tat + rate.interval.mul_f64(cost.max(0.0)));
        None
    }

    /// Books one unit on the limiter `key` for a job: a job holding `ticket` (it was parked
    /// with one) books nothing again: it runs now if its slot has come, or waits for the rest
    /// (parked again, its ticket kept, if that is beyond `park_after`); otherwise the next free
    /// slot is booked (the TAT moves one interval on) and the wait until it is returned. A wait
    /// beyond `park_after` stores the ticket with its slot, valid until the slot plus
    /// [`TICKET_GRACE`], and parks the job.
    pub fn book(
        &self,
        key: &str,
        ticket: &str,
        rate: Rate,
        park_after: Option<Duration>,
    ) -> Booking {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now);
        if let Some((parked, slot, _)) = inner.tickets.remove(ticket).filter(|t| t.2 > now) {
            let left = slot.saturating_duration_since(now);
            if left.is_zero() {
                return Booking::Ticket(now - parked);
            }
            if park_after.is_some_and(|after| left > after) {
                // Back early (a redelivery before its delay): parked again for the rest.
                inner
                    .tickets
                    .insert(ticket.to_owned(), (parked, slot, slot + TICKET_GRACE));
                return Booking::Parked(left);
            }
            return Booking::After(left);
        }
        let tat = inner.tats.get(key).copied().unwrap_or(now).max(now);
        let wait = (tat - now).saturating_sub(rate.tolerance);
        inner.tats.insert(key.to_owned(), tat + rate.interval);
        if wait.is_zero() {
            return Booking::Now;
        }
        if park_after.is_some_and(|after| wait > after) {
            inner.tickets.insert(
                ticket.to_owned(),
                (now, now + wait, now + wait + TICKET_GRACE),
            );
            return Booking::Parked(wait);
        }
        Booking::After(wait)
    }

    /// Moves the TAT by `delta` units (negative gives units back), never below now.
    pub fn adjust(&self, key: &str, delta: f64, rate: Rate) {
        let now = Instant::now();
        let mut inner = self.lock();
        let tat = inner.tats.get(key).copied().unwrap_or(now).max(now);
        let moved = if delta >= 0.0 {
            tat + rate.interval.mul_f64(delta)
        } else {
            tat.checked_sub(rate.interval.mul_f64(-delta))
                .unwrap_or(now)
                .max(now)
        };
        inner.tats.insert(key.to_owned(), moved);
    }

    /// Adds `amount` to both sums; with `check`, only if neither limit is then exceeded.
    pub fn spend(&self, keys: &BudgetKeys, amount: f64, check: bool) -> Spend {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.sweep(now);
        let current = |inner: &Inner, key: &str| {
            inner
                .sums
                .get(key)
                .filter(|(_, expires)| *expires > now)
                .map_or(0.0, |(v, _)| *v)
        };
        let (day, month) = (current(&inner, &keys.day), current(&inner, &keys.month));
        let over = |spent: f64, limit: Option<f64>| limit.is_some_and(|l| spent + amount > l);
        if check && (over(day, keys.day_limit) || over(month, keys.month_limit)) {
            return Spend {
                allowed: false,
                day,
                month,
            };
        }
        let (day, month) = (day + amount, month + amount);
        inner.sums.insert(keys.day.clone(), (day, now + DAY_TTL));
        inner
            .sums
            .insert(keys.month.clone(), (month, now + MONTH_TTL));
        Spend {
            allowed: true,
            day,
            month,
        }
    }
}

impl Inner {
    fn sweep(&mut self, now: Instant) {
        self.ops += 1;
        if !self.ops.is_multiple_of(SWEEP_EVERY) {
            return;
        }
        self.tats.retain(|_, tat| *tat > now);
        self.sums.retain(|_, (_, expires)| *expires > now);
        self.tickets.retain(|_, (_, _, expires)| *expires > now);
    }
}

/// GCRA in Lua. KEYS[1]: the TAT (ms since the epoch, Redis' clock). ARGV: cost, interval_ms,
/// tolerance_ms, mode (`t`: throttle, `a`: adjust). Returns the wait in ms, or -1 when admitted.
pub const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local cost = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
if ARGV[4] == 't' and tat - now > tolerance then
  return math.ceil(tat - now - tolerance)
end
local new = tat + cost * interval
if new < now then new = now end
local ttl = math.ceil(new - now + tolerance) + 1000
redis.call('SET', KEYS[1], string.format('%.3f', new), 'PX', ttl)
return -1
";

/// [`MemoryCounters::book`] for several jobs of one limiter at once, in Lua. KEYS: the TAT,
/// then each job's ticket. ARGV: interval_ms, tolerance_ms, ticket grace ms, then each job's
/// park_after_ms (negative: never park). Returns {kind, ms} per job: kind 0 now, 1 after `ms`,
/// 2 parked for `ms`, 3 back on its ticket after `ms` parked. A ticket holds
/// `<parked at>:<slot>` (ms, Redis' clock).
pub const BOOK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local grace = tonumber(ARGV[3])
local out = {}
local booked = false
for i = 2, #KEYS do
  local park_after = tonumber(ARGV[i + 2])
  local ticket = redis.call('GET', KEYS[i])
  if ticket then
    local sep = string.find(ticket, ':', 1, true)
    local parked_at = tonumber(string.sub(ticket, 1, sep - 1))
    local slot = tonumber(string.sub(ticket, sep + 1))
    local left = math.ceil(slot - now)
    if left <= 0 then
      redis.call('DEL', KEYS[i])
      out[#out + 1] = 3
      out[#out + 1] = math.max(0, math.floor(now - parked_at))
    elseif park_after >= 0 and left > park_after then
      out[#out + 1] = 2
      out[#out + 1] = left
    else
      redis.call('DEL', KEYS[i])
      out[#out + 1] = 1
      out[#out + 1] = left
    end
  else
    local wait = math.ceil(tat - now - tolerance)
    tat = tat + interval
    booked = true
    if wait <= 0 then
      out[#out + 1] = 0
      out[#out + 1] = 0
    elseif park_after >= 0 and wait > park_after then
      redis.call('SET', KEYS[i], string.format('%.3f:%.3f', now, now + wait), 'PX', wait + grace)
      out[#out + 1] = 2
      out[#out + 1] = wait
    else
      out[#out + 1] = 1
      out[#out + 1] = wait
    end
  end
end
if booked then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil(tat - now + tolerance) + 1000)
end
return out
";

/// Budget reservation in Lua. KEYS: day sum, month sum. ARGV: amount, day limit, month limit
/// (negative: none), day ttl ms, month ttl ms, check (`1`/`0`). Returns {allowed, day, month}.
pub const SPEND: &str = r"
local day = tonumber(redis.call('GET', KEYS[1]) or '0')
local month = tonumber(redis.call('GET', KEYS[2]) or '0')
local amount = tonumber(ARGV[1])
local dl = tonumber(ARGV[2])
local ml = tonumber(ARGV[3])
if ARGV[6] == '1' and ((dl >= 0 and day + amount > dl) or (ml >= 0 and month + amount > ml)) then
  return {0, tostring(day), tostring(month)}
end
day = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
month = redis.call('INCRBYFLOAT', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, day, month}
";

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_sec: f64, burst_ms: u64) -> Rate {
        Rate::new(
            per_sec,
            Duration::from_secs(1),
            Duration::from_millis(burst_ms),
        )
    }

    #[test]
    fn the_limiter_admits_its_burst_then_one_per_interval() {
        let c = MemoryCounters::default();
        let r = rate(10.0, 200);
        // Debt may reach 200 ms: three calls (0, 100, 200 ms of debt) pass, the fourth waits.
        let admitted = (0..10)
            .filter(|_| c.throttle("k", 1.0, r).is_none())
            .count();
        assert_eq!(admitted, 3);
        let wait = c.throttle("k", 1.0, r).expect("throttled");
        assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn booking_takes_the_next_slot_and_parks_beyond_the_horizon() {
        let c = MemoryCounters::default();
        let r = rate(10.0, 0);
        let park = Some(Duration::from_millis(250));
        assert_eq!(c.book("k", "j1", r, park), Booking::Now);
        // Each booking takes its own slot: 100 ms, then 200 ms out.
        let Booking::After(w2) = c.book("k", "j2", r, park) else {
            panic!("second job waits");
        };
        let Booking::After(w3) = c.book("k", "j3", r, park) else {
            panic!("third job waits");
        };
        assert!(w2 > Duration::from_millis(90) && w2 <= Duration::from_millis(100));
        assert!(w3 > Duration::from_millis(190) && w3 <= Duration::from_millis(200));
        // 300 ms out is past the horizon: parked, with a ticket.
        let Booking::Parked(w4) = c.book("k", "j4", r, park) else {
            panic!("fourth job parks");
        };
        assert!(w4 > Duration::from_millis(290), "{w4:?}");
        // Back early with its ticket, it is parked again for the rest of its wait, booking
        // nothing more.
        let Booking::Parked(rest) = c.book("k", "j4", r, park) else {
            panic!("an early return parks again");
        };
        assert!(rest <= w4, "{rest:?} of {w4:?}");
        std::thread::sleep(w4);
        // Back when its slot has come, it runs at once; the ticket is used up.
        assert!(matches!(c.book("k", "j4", r, park), Booking::Ticket(_)));
        // A used ticket is gone: the same name books a new slot, after the parked one.
        let Booking::After(w5) = c.book("k", "j4", r, park) else {
            panic!("a used ticket is gone");
        };
        assert!(w5 > Duration::from_millis(50), "{w5:?}");
        // A source that cannot park waits however long.
        assert!(matches!(c.book("k", "j6", r, None), Booking::After(_)));
    }

    #[test]
    fn reconciling_an_estimate_gives_tokens_back() {
        let c = MemoryCounters::default();
        let r = rate(100.0, 0);
        assert!(c.throttle("k", 50.0, r).is_none());
        assert!(c.throttle("k", 1.0, r).is_some(), "half a second of debt");
        c.adjust("k", -50.0, r);
        assert!(c.throttle("k", 1.0, r).is_none(), "debt repaid");
    }

    #[test]
    fn a_budget_refuses_what_would_exceed_it_and_settles_differences() {
        let c = MemoryCounters::default();
        let keys = BudgetKeys {
            day: "d".into(),
            month: "m".into(),
            day_limit: Some(1.0),
            month_limit: Some(10.0),
        };
        assert!(c.spend(&keys, 0.6, true).allowed);
        assert!(!c.spend(&keys, 0.6, true).allowed);
        let settled = c.spend(&keys, -0.2, false);
        assert!((settled.day - 0.4).abs() < 1e-9);
        assert!(c.spend(&keys, 0.6, true).allowed);
    }
}
