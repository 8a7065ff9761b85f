//! The fair scheduler between admission and the worker pools.
//!
//! A job that holds its claim first books its turn on its tenant's requests-per-second limiter
//! (shared by every replica, see [`Gate::book_job`]): now, after a wait, or, when that wait is
//! longer than `limits.park_after_ms` and the source can redeliver later, not here at all: the
//! job is parked (JetStream nak with that delay, the Kafka delay topic) with a ticket that lets
//! it run at once when it comes back. So a throttled tenant's backlog never holds in-flight
//! slots or the source's line; only the jobs whose turn is near wait in the process.
//!
//! Waiting jobs sit in their tenant's bounded queue (one lane per priority) with the slot times
//! the tenant booked; a dispatcher hands free run slots (`limits.max_running_jobs`) out by
//! weighted deficit round robin over the tenants whose next booked slot has come, high before
//! normal before low within a tenant (the earliest slot goes to the most urgent job). A job
//! whose turn has come while no job waits and a run slot is free takes that slot itself, as
//! the dispatcher would have given it, without the hop through the dispatcher. A
//! tenant's queue bound defaults to a fair share of `limits.max_inflight_jobs`: the bound over
//! the tenants with jobs queued, plus one, so a newcomer always finds room.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gate::Gate;
use crate::state::Booking;
use crate::wire::Priority;

/// The smallest fair share of the in-flight bound a tenant's queue gets.
const MIN_FAIR_SHARE: usize = 8;

/// Permission to run a pipeline; the slot frees when it is dropped.
#[derive(Debug)]
pub struct RunSlot {
    _permit: OwnedSemaphorePermit,
    /// How long the job waited for its turn: in its tenant's queue, and parked before that.
    pub queued: Duration,
    /// Whether its tenant's rate limit held it back.
    pub throttled: bool,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// The tenant's queue is at its bound.
    QueueFull,
    /// Its turn is this far off: hand it back to come again then (its ticket is booked).
    Parked(Duration),
}

/// A job's booked turn under its tenant's rate limit, to queue with [`Scheduler::admit`].
#[derive(Debug, Clone, Copy)]
pub struct Booked {
    /// When its turn comes.
    slot_at: Instant,
    /// How long it was parked before it came back on its ticket.
    parked: Duration,
    /// A unit of the tenant's limiter is spent on it (given back if the job turns out a
    /// duplicate, see [`Scheduler::give_back`]).
    unit: bool,
    /// Its tenant's queue had room when it was booked: it is not turned away again.
    had_room: bool,
}

impl Booked {
    /// No booking: the job's turn is now (no rate limit applies, or it will not run).
    pub fn now() -> Self {
        Self {
            slot_at: Instant::now(),
            parked: Duration::ZERO,
            unit: false,
            had_room: false,
        }
    }
}

/// Longest a job waits for its booked turn in the process (a bound against absurd waits).
const MAX_WAIT: Duration = Duration::from_secs(86_400);

/// Where a job's wait was spent (the `reason` of `switchyard_job_wait_seconds`).
struct Waited {
    /// For its tenant's booked slot.
    rate: Duration,
    /// For a run slot once its turn had come.
    run_slot: Duration,
    /// Parked outside the process before it came back.
    parked: Duration,
}

struct Waiter {
    tx: oneshot::Sender<RunSlot>,
    enqueued: Instant,
    /// Parked this long before it came back on its ticket.
    parked: Duration,
}

#[derive(Default)]
struct TenantQueue {
    lanes: [VecDeque<Waiter>; 3],
    /// The limiter slots booked for the waiting jobs, earliest first.
    slots: BinaryHeap<Reverse<Instant>>,
    deficit: u32,
}

impl TenantQueue {
    fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    fn pop(&mut self) -> Option<Waiter> {
        self.lanes.iter_mut().find_map(VecDeque::pop_front)
    }
}

fn lane(priority: Priority) -> usize {
    match priority {
        Priority::High => 0,
        Priority::Normal => 1,
        Priority::Low => 2,
    }
}

#[derive(Default)]
struct Queues {
    tenants: HashMap<String, TenantQueue>,
    /// Tenants with waiting jobs, in round-robin order.
    ring: VecDeque<String>,
}

struct Shared {
    queues: Mutex<Queues>,
    /// Run slots (`limits.max_running_jobs`).
    slots: Arc<Semaphore>,
    wake: Notify,
    gate: Arc<Gate>,
    max_inflight: usize,
    park_after: Duration,
}

#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

/// What the scheduler is sized by.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    /// Run slots (`limits.max_running_jobs`).
    pub max_running: usize,
    /// The in-flight bound the default queue bounds share (`limits.max_inflight_jobs`).
    pub max_inflight: usize,
    /// `limits.park_after_ms`.
    pub park_after: Duration,
}

impl Scheduler {
    /// Starts the dispatcher on `tasks`; it stops with `stop`.
    pub fn start(
        gate: Arc<Gate>,
        limits: SchedulerLimits,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            slots: Arc::new(Semaphore::new(limits.max_running)),
            wake: Notify::new(),
            gate,
            max_inflight: limits.max_inflight,
            park_after: limits.park_after,
        });
        tasks.spawn(dispatch(shared.clone(), stop));
        Self { shared }
    }

    /// The gate every admitted job's calls pass.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.shared.gate
    }

    /// Books the turn of the job `job_key` of `tenant` (one round trip to the state store).
    /// `can_park`: its source can redeliver it later, so a far-off turn parks it and a full
    /// queue refuses it (otherwise it waits here for both).
    pub async fn book(
        &self,
        tenant: &str,
        job_key: &str,
        can_park: bool,
    ) -> Result<Booked, NotQueued> {
        if can_park && !self.has_room(tenant) {
            return Err(NotQueued::QueueFull);
        }
        let park_after = can_park.then_some(self.shared.park_after);
        let booking = self.shared.gate.book_job(tenant, job_key, park_after).await;
        let now = Instant::now();
        let unit = self.shared.gate.tenants().get(tenant).rps.is_some();
        Ok(match booking {
            Booking::Now => Booked {
                unit,
                had_room: can_park,
                ..Booked::now()
            },
            Booking::Ticket(parked) => Booked {
                slot_at: now,
                parked,
                unit,
                had_room: can_park,
            },
            Booking::After(wait) => Booked {
                slot_at: now + wait.min(MAX_WAIT),
                parked: Duration::ZERO,
                unit,
                had_room: can_park,
            },
            Booking::Parked(wait) => {
                self.shared
                    .gate
                    .metrics()
                    .jobs_parked
                    .with_label_values(&["rate_limit"])
                    .inc();
                return Err(NotQueued::Parked(wait));
            }
        })
    }

    /// Queues a booked job and waits for its run slot. `Ok(None)` when the scheduler stopped.
    pub async fn admit(
        &self,
        tenant: &str,
        priority: Priority,
        booked: Booked,
    ) -> Result<Option<RunSlot>, NotQueued> {
        if !booked.had_room && !self.has_room(tenant) {
            return Err(NotQueued::QueueFull);
        }
        let Booked {
            slot_at, parked, ..
        } = booked;
        let enqueued = Instant::now();
        let rx = {
            let mut q = self.shared.lock();
            // Its turn has come, nobody is waiting and a run slot is free: the dispatcher would
            // hand it that slot at once, so it takes it here without the round trip through
            // the dispatcher. With anyone waiting it queues, so the order stays fair.
            if slot_at <= enqueued && q.nobody_waiting() {
                if let Ok(permit) = self.shared.slots.clone().try_acquire_owned() {
                    drop(q);
                    return Ok(Some(
                        self.shared.run_slot(permit, enqueued, slot_at, parked),
                    ));
                }
            }
            let (tx, rx) = oneshot::channel();
            let queues = &mut *q;
            let queue = queues.tenants.entry(tenant.to_owned()).or_default();
            if !queues.ring.iter().any(|t| t == tenant) {
                queues.ring.push_back(tenant.to_owned());
            }
            queue.slots.push(Reverse(slot_at));
            queue.lanes[lane(priority)].push_back(Waiter {
                tx,
                enqueued,
                parked,
            });
            rx
        };
        self.shared.wake.notify_one();
        let queued = &self.shared.gate.metrics().tenant_queued;
        queued.inc();
        // Decremented however the wait ends, including when the job gives up waiting.
        let _counted = scopeguard(|| queued.dec());
        Ok(rx.await.ok())
    }

    /// Gives a booked unit back to the tenant's limiter: the job turned out a duplicate, its
    /// stored outcome is replayed and it never runs.
    pub async fn give_back(&self, tenant: &str, booked: Booked) {
        if booked.unit {
            self.shared.gate.unbook_job(tenant).await;
        }
    }

    /// Whether the tenant's queue is below its bound: its own `max_queued`, else a fair share
    /// of the in-flight bound among the tenants with jobs queued here, plus one.
    fn has_room(&self, tenant: &str) -> bool {
        let configured = self.shared.gate.tenants().get(tenant).max_queued;
        let mut q = self.shared.lock();
        let others = q
            .tenants
            .iter()
            .filter(|(name, queue)| name.as_str() != tenant && queue.len() > 0)
            .count();
        let bound = configured
            .unwrap_or_else(|| (self.shared.max_inflight / (others + 2)).max(MIN_FAIR_SHARE));
        let Some(queue) = q.tenants.get_mut(tenant) else {
            return true;
        };
        if queue.len() >= bound {
            // Jobs that stopped waiting (deadline, shutdown) do not hold places.
            for lane in &mut queue.lanes {
                lane.retain(|w| !w.tx.is_closed());
            }
        }
        queue.len() < bound
    }

    /// Jobs waiting for a slot, over all tenants.
    pub fn queued(&self) -> usize {
        self.shared
            .lock()
            .tenants
            .values()
            .map(TenantQueue::len)
            .sum()
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The run slot of a job queued at `enqueued` (after `parked` outside the process) whose
    /// booked turn was `slot_at`, given now; its waits are observed.
    fn run_slot(
        &self,
        permit: OwnedSemaphorePermit,
        enqueued: Instant,
        slot_at: Instant,
        parked: Duration,
    ) -> RunSlot {
        let now = Instant::now();
        let turn = slot_at.max(enqueued);
        let waited = Waited {
            rate: turn.saturating_duration_since(enqueued),
            run_slot: now.saturating_duration_since(turn),
            parked,
        };
        let metrics = self.gate.metrics();
        for (reason, wait) in [
            ("tenant_rate", waited.rate),
            ("run_slot", waited.run_slot),
            ("parked", waited.parked),
        ] {
            if !wait.is_zero() {
                metrics
                    .job_wait
                    .with_label_values(&[reason])
                    .observe(wait.as_secs_f64());
            }
        }
        RunSlot {
            _permit: permit,
            queued: now.duration_since(enqueued) + parked,
            // Held back by its tenant's limit: a booked slot it had to wait for (beyond a
            // millisecond of scheduling), or parked.
            throttled: waited.rate > Duration::from_millis(1) || !parked.is_zero(),
        }
    }
}

impl Queues {
    /// No job waits in any tenant's queue.
    fn nobody_waiting(&self) -> bool {
        self.tenants.values().all(|queue| queue.len() == 0)
    }

    /// The next waiter by weighted deficit round robin over the tenants whose earliest booked
    /// slot has come, with that slot's time; otherwise the earliest time a slot comes.
    fn next(
        &mut self,
        now: Instant,
        weight: impl Fn(&str) -> u32,
    ) -> Result<(Waiter, Instant), Option<Instant>> {
        let mut earliest: Option<Instant> = None;
        let mut visits = 2 * self.ring.len();
        while visits > 0 {
            visits -= 1;
            let Some(name) = self.ring.front().cloned() else {
                break;
            };
            let Some(queue) = self.tenants.get_mut(&name) else {
                self.ring.pop_front();
                continue;
            };
            if queue.len() == 0 {
                // Slots left by jobs that gave up are dropped with the queue.
                self.ring.pop_front();
                self.tenants.remove(&name);
                continue;
            }
            let slot = queue.slots.peek().map_or(now, |Reverse(at)| *at);
            if slot > now {
                earliest = Some(earliest.map_or(slot, |e| e.min(slot)));
                self.ring.rotate_left(1);
                continue;
            }
            if queue.deficit == 0 {
                queue.deficit = weight(&name).max(1);
            }
            queue.deficit -= 1;
            let Some(waiter) = queue.pop() else {
                continue;
            };
            queue.slots.pop();
            if queue.deficit == 0 {
                self.ring.rotate_left(1);
            }
            return Ok((waiter, slot));
        }
        Err(earliest)
    }
}

async fn dispatch(shared: Arc<Shared>, stop: CancellationToken) {
    let tenants = shared.gate.tenants().clone();
    let weight = |name: &str| tenants.get(name).weight;
    let slots = shared.slots.clone();
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let mut permit = Some(permit);
        while let Some(slot_permit) = permit.take() {
            let next = shared.lock().next(Instant::now(), weight);
            let (waiter, slot_at) = match next {
                Ok(found) => found,
                Err(earliest) => {
                    let wake_at =
                        earliest.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = shared.wake.notified() => {}
                        () = tokio::time::sleep_until(wake_at.into()) => {}
                    }
                    permit = Some(slot_permit);
                    continue;
                }
            };
            if waiter.tx.is_closed() {
                // The job stopped waiting (deadline or shutdown): the slot goes to the next.
                permit = Some(slot_permit);
                continue;
            }
            let slot = shared.run_slot(slot_permit, waiter.enqueued, slot_at, waiter.parked);
            if let Err(slot) = waiter.tx.send(slot) {
                permit = Some(slot._permit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queues(jobs: &[(&str, Priority, usize)]) -> (Queues, Vec<oneshot::Receiver<RunSlot>>) {
        let mut q = Queues::default();
        let mut keep = Vec::new();
        let now = Instant::now();
        for &(tenant, priority, n) in jobs {
            for _ in 0..n {
                let (tx, rx) = oneshot::channel();
                keep.push(rx);
                let queue = q.tenants.entry(tenant.to_owned()).or_default();
                if queue.len() == 0 {
                    q.ring.push_back(tenant.to_owned());
                }
                queue.slots.push(Reverse(now));
                queue.lanes[lane(priority)].push_back(Waiter {
                    tx,
                    enqueued: now,
                    parked: Duration::ZERO,
                });
            }
        }
        (q, keep)
    }

    #[test]
    fn slots_are_shared_by_weight() {
        let (mut q, _rx) = queues(&[("a", Priority::Normal, 100), ("b", Priority::Normal, 100)]);
        let weight = |t: &str| if t == "a" { 3 } else { 1 };
        for _ in 0..40 {
            q.next(Instant::now(), weight).ok().unwrap();
        }
        let left_a = q.tenants["a"].len();
        let left_b = q.tenants["b"].len();
        assert_eq!((100 - left_a, 100 - left_b), (30, 10), "weight 3 against 1");
    }

    #[test]
    fn high_priority_goes_first_within_a_tenant() {
        let (mut q, _rx) = queues(&[("a", Priority::Low, 3), ("a", Priority::High, 2)]);
        for _ in 0..2 {
            q.next(Instant::now(), |_| 1).ok().unwrap();
        }
        let a = &q.tenants["a"];
        assert_eq!(
            (a.lanes[0].len(), a.lanes[2].len()),
            (0, 3),
            "both high first"
        );
    }

    #[test]
    fn a_tenant_waits_for_its_booked_slot_while_others_go() {
        let (mut q, _rx) = queues(&[("a", Priority::Normal, 2), ("b", Priority::Normal, 5)]);
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        // Tenant a's jobs booked slots a second out.
        let a = q.tenants.get_mut("a").unwrap();
        a.slots.clear();
        a.slots.push(Reverse(later));
        a.slots.push(Reverse(later + Duration::from_millis(10)));
        for _ in 0..5 {
            q.next(now, |_| 1).ok().unwrap();
        }
        assert_eq!(q.tenants["b"].len(), 0, "b's jobs all went while a waited");
        assert_eq!(q.tenants["a"].len(), 2);
        let until = q.next(now, |_| 1).err().flatten().unwrap();
        assert_eq!(until, later);
        let (_, slot) = q.next(later, |_| 1).ok().unwrap();
        assert_eq!(slot, later);
    }
}
