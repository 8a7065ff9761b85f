//! The fair scheduler between admission and the worker pools.
//!
//! A job that holds its claim waits here for a run slot (`limits.max_running_jobs` per replica).
//! Each tenant has a bounded queue with one lane per priority; a dispatcher hands free slots out
//! by weighted deficit round robin over the tenants that have jobs waiting, high before normal
//! before low within a tenant. Before a job is handed a slot its tenant's requests-per-second
//! limiter must admit it; a throttled tenant is skipped until its limiter allows the next job,
//! so the other tenants' jobs keep flowing past it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::gate::Gate;
use crate::wire::Priority;

/// Permission to run a pipeline; the slot frees when it is dropped.
#[derive(Debug)]
pub struct RunSlot {
    _permit: OwnedSemaphorePermit,
    /// How long the job waited in its tenant's queue.
    pub queued: Duration,
    /// Whether its tenant's rate limit held it back while it waited.
    pub throttled: bool,
}

/// The tenant's queue is at its bound.
#[derive(Debug)]
pub struct QueueFull;

struct Waiter {
    tx: oneshot::Sender<RunSlot>,
    priority: Priority,
    enqueued: Instant,
}

#[derive(Default)]
struct TenantQueue {
    lanes: [VecDeque<Waiter>; 3],
    deficit: u32,
    throttled_until: Option<Instant>,
    last_throttled: Option<Instant>,
}

impl TenantQueue {
    fn len(&self) -> usize {
        self.lanes.iter().map(VecDeque::len).sum()
    }

    fn pop(&mut self) -> Option<Waiter> {
        self.lanes.iter_mut().find_map(VecDeque::pop_front)
    }

    fn push_front(&mut self, waiter: Waiter) {
        self.lanes[lane(waiter.priority)].push_front(waiter);
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
    wake: Notify,
    gate: Arc<Gate>,
}

#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
}

impl Scheduler {
    /// Starts the dispatcher on `tasks`; it stops with `stop`.
    pub fn start(
        gate: Arc<Gate>,
        max_running: usize,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            wake: Notify::new(),
            gate,
        });
        let slots = Arc::new(Semaphore::new(max_running));
        tasks.spawn(dispatch(shared.clone(), slots, stop));
        Self { shared }
    }

    /// The gate every admitted job's calls pass.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.shared.gate
    }

    /// Waits for a run slot for a job of `tenant`. `None` when the scheduler stopped.
    pub async fn admit(
        &self,
        tenant: &str,
        priority: Priority,
    ) -> Result<Option<RunSlot>, QueueFull> {
        let max_queued = self.shared.gate.tenants().get(tenant).max_queued;
        let (tx, rx) = oneshot::channel();
        {
            let mut q = self.shared.lock();
            let queues = &mut *q;
            let queue = queues.tenants.entry(tenant.to_owned()).or_default();
            if queue.len() >= max_queued {
                // Jobs that stopped waiting (deadline, shutdown) do not hold places.
                for lane in &mut queue.lanes {
                    lane.retain(|w| !w.tx.is_closed());
                }
                if queue.len() >= max_queued {
                    return Err(QueueFull);
                }
            }
            if !queues.ring.iter().any(|t| t == tenant) {
                queues.ring.push_back(tenant.to_owned());
            }
            queue.lanes[lane(priority)].push_back(Waiter {
                tx,
                priority,
                enqueued: Instant::now(),
            });
        }
        self.shared.wake.notify_one();
        let queued = &self.shared.gate.metrics().tenant_queued;
        queued.inc();
        // Decremented however the wait ends, including when the job gives up waiting.
        let _counted = scopeguard(|| queued.dec());
        Ok(rx.await.ok())
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
}

impl Queues {
    /// The next waiter by weighted deficit round robin, skipping throttled tenants; otherwise
    /// the earliest time a throttled tenant may go again.
    fn next(
        &mut self,
        now: Instant,
        weight: impl Fn(&str) -> u32,
    ) -> Result<(String, Waiter), Option<Instant>> {
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
                self.ring.pop_front();
                if queue.throttled_until.is_none_or(|t| t <= now) {
                    self.tenants.remove(&name);
                }
                continue;
            }
            if let Some(until) = queue.throttled_until.filter(|t| *t > now) {
                earliest = Some(earliest.map_or(until, |e| e.min(until)));
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
            if queue.deficit == 0 {
                self.ring.rotate_left(1);
            }
            return Ok((name, waiter));
        }
        Err(earliest)
    }

    /// Puts a waiter back at the head of its lane and holds its tenant back until `until`.
    fn throttle(&mut self, tenant: &str, waiter: Waiter, until: Instant) {
        let queue = self.tenants.entry(tenant.to_owned()).or_default();
        if queue.len() == 0 && !self.ring.iter().any(|t| t == tenant) {
            self.ring.push_back(tenant.to_owned());
        }
        queue.push_front(waiter);
        queue.throttled_until = Some(until);
        queue.last_throttled = Some(Instant::now());
    }
}

async fn dispatch(shared: Arc<Shared>, slots: Arc<Semaphore>, stop: CancellationToken) {
    let tenants = shared.gate.tenants().clone();
    let weight = |name: &str| tenants.get(name).weight;
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
            let (tenant, waiter) = match next {
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
            if let Some(wait) = shared.gate.admit_job(&tenant).await {
                shared
                    .lock()
                    .throttle(&tenant, waiter, Instant::now() + wait);
                permit = Some(slot_permit);
                continue;
            }
            let throttled = shared
                .lock()
                .tenants
                .get(&tenant)
                .and_then(|q| q.last_throttled)
                .is_some_and(|t| t > waiter.enqueued);
            let slot = RunSlot {
                _permit: slot_permit,
                queued: waiter.enqueued.elapsed(),
                throttled,
            };
            if let Err(slot) = waiter.tx.send(slot) {
                permit = Some(slot._permit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(priority: Priority) -> (Waiter, oneshot::Receiver<RunSlot>) {
        let (tx, rx) = oneshot::channel();
        (
            Waiter {
                tx,
                priority,
                enqueued: Instant::now(),
            },
            rx,
        )
    }

    fn queues(jobs: &[(&str, Priority, usize)]) -> (Queues, Vec<oneshot::Receiver<RunSlot>>) {
        let mut q = Queues::default();
        let mut keep = Vec::new();
        for &(tenant, priority, n) in jobs {
            for _ in 0..n {
                let (w, rx) = waiter(priority);
                keep.push(rx);
                let queue = q.tenants.entry(tenant.to_owned()).or_default();
                if queue.len() == 0 {
                    q.ring.push_back(tenant.to_owned());
                }
                queue.lanes[lane(priority)].push_back(w);
            }
        }
        (q, keep)
    }

    #[test]
    fn slots_are_shared_by_weight() {
        let (mut q, _rx) = queues(&[("a", Priority::Normal, 100), ("b", Priority::Normal, 100)]);
        let weight = |t: &str| if t == "a" { 3 } else { 1 };
        let picks: Vec<String> = (0..40)
            .map(|_| q.next(Instant::now(), weight).ok().unwrap().0)
            .collect();
        let a = picks.iter().filter(|t| *t == "a").count();
        assert_eq!(a, 30, "weight 3 against 1: {picks:?}");
    }

    #[test]
    fn high_priority_goes_first_within_a_tenant() {
        let (mut q, _rx) = queues(&[("a", Priority::Low, 3), ("a", Priority::High, 2)]);
        let first: Vec<Priority> = (0..5)
            .map(|_| q.next(Instant::now(), |_| 1).ok().unwrap().1.priority)
            .collect();
        assert_eq!(first[..2], [Priority::High, Priority::High]);
    }

    #[test]
    fn a_throttled_tenant_is_skipped_until_its_time() {
        let (mut q, _rx) = queues(&[("a", Priority::Normal, 5), ("b", Priority::Normal, 5)]);
        let now = Instant::now();
        let (tenant, w) = q.next(now, |_| 1).ok().unwrap();
        assert_eq!(tenant, "a");
        q.throttle("a", w, now + Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(q.next(now, |_| 1).ok().unwrap().0, "b");
        }
        let until = q.next(now, |_| 1).err().flatten().unwrap();
        assert_eq!(until, now + Duration::from_secs(1));
        assert_eq!(q.next(until, |_| 1).ok().unwrap().0, "a");
    }
}
