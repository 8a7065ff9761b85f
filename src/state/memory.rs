//! In-process state store for embedded mode and tests: a map behind a short-held mutex.
//!
//! Bounded: completed entries expire after their TTL and the oldest are evicted beyond
//! `max_entries`; claims live only while their job is in flight (bounded by max in-flight jobs).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Claim, ClaimToken};

enum Entry {
    Claimed { owner: ClaimToken, expires: Instant },
    Done { outcome: Bytes, expires: Instant },
}

struct Inner {
    entries: HashMap<String, Entry>,
    /// Completed keys in completion order (all share one TTL, so this is also expiry order).
    done_order: VecDeque<(String, Instant)>,
}

#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    max_entries: usize,
    counters: super::counters::MemoryCounters,
    /// Cached provider responses: entries with their expiry, and insertion order for eviction.
    cache: Arc<Mutex<CacheEntries>>,
}

/// Cached responses with their expiry, and keys in insertion order for eviction.
type CacheEntries = (HashMap<String, (Bytes, Instant)>, VecDeque<String>);

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: HashMap::new(),
                done_order: VecDeque::new(),
            })),
            max_entries: max_entries.max(1),
            counters: Default::default(),
            cache: Default::default(),
        }
    }

    pub fn cache_get(&self, key: &str) -> Option<Bytes> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .0
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(v, _)| v.clone())
    }

    /// Stores a response; the oldest entries go beyond `max_entries`.
    pub fn cache_put(&self, key: &str, value: Bytes, ttl: Duration) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let (entries, order) = &mut *cache;
        if entries
            .insert(key.to_owned(), (value, Instant::now() + ttl))
            .is_none()
        {
            order.push_back(key.to_owned());
        }
        while order.len() > self.max_entries {
            if let Some(oldest) = order.pop_front() {
                entries.remove(&oldest);
            }
        }
    }

    pub fn counters(&self) -> &super::counters::MemoryCounters {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn claim(&self, key: &str, lease: Duration) -> Claim {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.expire(now);
        match inner.entries.get(key) {
            Some(Entry::Done { outcome, expires }) if *expires > now => {
                return Claim::Done(outcome.clone())
            }
            Some(Entry::Claimed { expires, .. }) if *expires > now => return Claim::Busy,
            _ => {}
        }
        let owner = ClaimToken::random();
        inner.entries.insert(
            key.to_owned(),
            Entry::Claimed {
                owner: owner.clone(),
                expires: now + lease,
            },
        );
        Claim::Acquired(owner)
    }

    /// Extends `token`'s claim; false when it no longer holds the key.
    pub fn renew(&self, key: &str, token: &ClaimToken, lease: Duration) -> bool {
        let mut inner = self.lock();
        match inner.entries.get_mut(key) {
            Some(Entry::Claimed { owner, expires }) if owner == token => {
                *expires = Instant::now() + lease;
                true
            }
            Some(_) => false,
            None => {
                let claim = Entry::Claimed {
                    owner: token.clone(),
                    expires: Instant::now() + lease,
                };
                inner.entries.insert(key.to_owned(), claim);
                true
            }
        }
    }

    pub fn complete(&self, key: &str, outcome: Bytes, ttl: Duration) {
        // Stored even if the lease was taken over meanwhile: it is a valid final answer for the
        // key, and the later writer's is equally valid.
        let now = Instant::now();
        let expires = now + ttl;
        let mut inner = self.lock();
        inner
            .entries
            .insert(key.to_owned(), Entry::Done { outcome, expires });
        inner.done_order.push_back((key.to_owned(), expires));
        while inner.done_order.len() > self.max_entries {
            inner.evict_oldest();
        }
    }

    pub fn release(&self, key: &str, token: &ClaimToken) {
        let mut inner = self.lock();
        if matches!(inner.entries.get(key), Some(Entry::Claimed { owner, .. }) if owner == token) {
            inner.entries.remove(key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while self
            .done_order
            .front()
            .is_some_and(|(_, expires)| *expires <= now)
        {
            self.evict_oldest();
        }
    }

    fn evict_oldest(&mut self) {
        let Some((key, expires)) = self.done_order.pop_front() else {
            return;
        };
        // The key may have been completed again later; only drop the entry this record is for.
        if matches!(self.entries.get(&key), Some(Entry::Done { expires: e, .. }) if *e == expires) {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);
    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn a_completed_key_replays_its_outcome() {
        let store = MemoryStore::new(10);
        let Claim::Acquired(token) = store.claim("k", LEASE) else {
            panic!("first claim")
        };
        assert_eq!(store.claim("k", LEASE), Claim::Busy);
        assert!(
            store.renew("k", &token, LEASE),
            "the owner renews its lease"
        );
        assert!(
            !store.renew("k", &ClaimToken::random(), LEASE),
            "others cannot"
        );
        store.complete("k", Bytes::from_static(b"out"), TTL);
        assert_eq!(
            store.claim("k", LEASE),
            Claim::Done(Bytes::from_static(b"out"))
        );
    }

    #[test]
    fn an_expired_lease_can_be_taken_over() {
        let store = MemoryStore::new(10);
        assert!(matches!(
            store.claim("k", Duration::ZERO),
            Claim::Acquired(_)
        ));
        assert!(matches!(store.claim("k", LEASE), Claim::Acquired(_)));
    }

    #[test]
    fn release_only_drops_the_owners_claim() {
        let store = MemoryStore::new(10);
        let Claim::Acquired(token) = store.claim("k", LEASE) else {
            panic!("first claim")
        };
        store.release("k", &ClaimToken::random());
        assert_eq!(store.claim("k", LEASE), Claim::Busy);
        store.release("k", &token);
        assert!(matches!(store.claim("k", LEASE), Claim::Acquired(_)));
    }

    #[test]
    fn completed_entries_are_bounded() {
        let store = MemoryStore::new(3);
        for i in 0..10 {
            let key = format!("k{i}");
            let Claim::Acquired(_) = store.claim(&key, LEASE) else {
                panic!("claim")
            };
            store.complete(&key, Bytes::new(), TTL);
        }
        assert_eq!(store.len(), 3);
        assert!(matches!(store.claim("k9", LEASE), Claim::Done(_)));
        assert!(matches!(store.claim("k0", LEASE), Claim::Acquired(_)));
    }
}
