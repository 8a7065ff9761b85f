//! In-process state store for embedded mode and tests: a map behind a short-held mutex.
//!
//! Bounded: completed entries expire after their TTL and the oldest are evicted beyond
//! `max_entries`; claims live only while their job is in flight (bounded by max in-flight jobs).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Claim, ClaimToken, Renewal};

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
    /// Semantic-cache indexes: entries by score, with their expiry.
    indexes: Arc<Mutex<HashMap<String, IndexEntries>>>,
    max_entries: usize,
    counters: super::counters::MemoryCounters,
    /// Cached provider responses: entries with their expiry, and insertion order for eviction.
    cache: Arc<Mutex<CacheEntries>>,
}

/// A semantic-cache index: (score, entry, expiry), oldest first.
type IndexEntries = VecDeque<(i64, Bytes, Instant)>;

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
            indexes: Default::default(),
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

    pub fn index_add(
        &self,
        index: &str,
        score_ms: i64,
        entry: Bytes,
        max_entries: usize,
        ttl: Duration,
    ) {
        let now = Instant::now();
        let mut indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        let entries = indexes.entry(index.to_owned()).or_default();
        entries.retain(|(_, _, expires)| *expires > now);
        entries.push_back((score_ms, entry, now + ttl));
        while entries.len() > max_entries.max(1) {
            entries.pop_front();
        }
        // Bounded in count of indexes too, like the other entries.
        if indexes.len() > self.max_entries {
            if let Some(oldest) = indexes.keys().next().cloned() {
                indexes.remove(&oldest);
            }
        }
    }

    pub fn index_since(&self, index: &str, from_ms: i64, limit: usize) -> Vec<(Bytes, i64)> {
        let now = Instant::now();
        let indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        indexes
            .get(index)
            .map(|entries| {
                entries
                    .iter()
                    .filter(|(score, _, expires)| *score >= from_ms && *expires > now)
                    .take(limit)
                    .map(|(score, entry, _)| (entry.clone(), *score))
                    .collect()
            })
            .unwrap_or_default()
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

    /// Extends `token`'s claim (see [`super::Renewal`]).
    pub fn renew(&self, key: &str, token: &ClaimToken, lease: Duration) -> Renewal {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.entries.get_mut(key) {
            Some(Entry::Claimed { owner, expires }) if owner == token => {
                *expires = now + lease;
                Renewal::Held
            }
            Some(Entry::Done { expires, .. }) if *expires > now => Renewal::Finished,
            Some(Entry::Claimed { expires, .. }) if *expires > now => Renewal::Lost,
            _ => {
                let claim = Entry::Claimed {
                    owner: token.clone(),
                    expires: now + lease,
                };
                inner.entries.insert(key.to_owned(), claim);
                Renewal::Held
            }
        }
    }

    /// Stores the outcome when `token` holds the claim (or the key is free); false otherwise.
    pub fn complete(&self, key: &str, token: &ClaimToken, outcome: Bytes, ttl: Duration) -> bool {
        let now = Instant::now();
        let expires = now + ttl;
        let mut inner = self.lock();
        match inner.entries.get(key) {
            Some(Entry::Claimed { owner, expires }) if owner != token && *expires > now => {
                return false
            }
            Some(Entry::Done { expires, .. }) if *expires > now => return false,
            _ => {}
        }
        inner
            .entries
            .insert(key.to_owned(), Entry::Done { outcome, expires });
        inner.done_order.push_back((key.to_owned(), expires));
        while inner.done_order.len() > self.max_entries {
            inner.evict_oldest();
        }
        true
    }

    pub fn peek(&self, key: &str) -> super::Peek {
        let now = Instant::now();
        match self.lock().entries.get(key) {
            Some(Entry::Done { outcome, expires }) if *expires > now => {
                super::Peek::Done(outcome.clone())
            }
            Some(Entry::Claimed { expires, .. }) if *expires > now => super::Peek::Claimed,
            _ => super::Peek::Absent,
        }
    }

    pub fn forget_outcome(&self, key: &str, outcome: &[u8]) -> bool {
        let mut inner = self.lock();
        let same = matches!(inner.entries.get(key), Some(Entry::Done { outcome: o, .. }) if o.as_ref() == outcome);
        if same {
            inner.entries.remove(key);
        }
        same
    }

    /// Replaces a finished key's outcome, keeping its expiry; `false` when it holds none.
    pub fn replace_outcome(&self, key: &str, outcome: Bytes) -> bool {
        let now = Instant::now();
        match self.lock().entries.get_mut(key) {
            Some(Entry::Done {
                outcome: stored,
                expires,
            }) if *expires > now => {
                *stored = outcome;
                true
            }
            _ => false,
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
        assert_eq!(
            store.renew("k", &token, LEASE),
            Renewal::Held,
            "the owner renews its lease"
        );
        assert_eq!(
            store.renew("k", &ClaimToken::random(), LEASE),
            Renewal::Lost,
            "others cannot"
        );
        assert!(store.complete("k", &token, Bytes::from_static(b"out"), TTL));
        assert_eq!(
            store.claim("k", LEASE),
            Claim::Done(Bytes::from_static(b"out"))
        );
        assert_eq!(
            store.renew("k", &token, LEASE),
            Renewal::Finished,
            "a renew racing the job's own record is not a lost lease"
        );
    }

    #[test]
    fn a_worker_whose_lease_was_taken_over_cannot_record_over_the_new_holder() {
        let store = MemoryStore::new(10);
        let Claim::Acquired(old) = store.claim("k", Duration::ZERO) else {
            panic!("first claim")
        };
        let Claim::Acquired(new) = store.claim("k", LEASE) else {
            panic!("takeover after the lease lapsed")
        };
        assert!(!store.complete("k", &old, Bytes::from_static(b"stale"), TTL));
        assert_eq!(store.renew("k", &old, LEASE), Renewal::Lost);
        assert!(store.complete("k", &new, Bytes::from_static(b"fresh"), TTL));
        assert!(
            !store.complete("k", &old, Bytes::from_static(b"stale"), TTL),
            "nor over its outcome"
        );
        assert_eq!(
            store.claim("k", LEASE),
            Claim::Done(Bytes::from_static(b"fresh"))
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
            let Claim::Acquired(token) = store.claim(&key, LEASE) else {
                panic!("claim")
            };
            assert!(store.complete(&key, &token, Bytes::new(), TTL));
        }
        assert_eq!(store.len(), 3);
        assert!(matches!(store.claim("k9", LEASE), Claim::Done(_)));
        assert!(matches!(store.claim("k0", LEASE), Claim::Acquired(_)));
    }
}
