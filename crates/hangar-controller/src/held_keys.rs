//! A hint for get-or-create ([`crate::connect`]): the keys this controller recently found held or gave
//! a backend. A connect for a key not remembered here reads the drones for the scheduler alongside its
//! key lookup, so that a cold spawn does not wait for the two one after the other; a connect for a
//! remembered key skips that read, which only a spawn would use.
//!
//! Only a hint: the store's key lookup decides what happens to the key. A wrong answer costs one
//! read: a key held but not remembered (another controller's, evicted, or unused for
//! [`REMEMBERED_FOR`]) gets a drone read it does not need; a key remembered but free gets its drone
//! read after the lookup, as it would without the hint.

use hangar_types::api::KeyConfig;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a key stays remembered after it was last found held. A user's reconnects keep it fresh;
/// a key unused for longer is likely to have been released (idle backends stop).
pub const REMEMBERED_FOR: Duration = Duration::from_secs(60);

/// Slots of the table (a power of two). Each key maps to one slot, and a later key of the same slot
/// replaces it: memory stays bounded (about 400 KiB) however many keys pass through.
const SLOTS: usize = 1 << 14;

/// Recently held keys: a direct-mapped table of key hashes and when each was last seen held.
pub struct HeldKeys {
    hasher: std::collections::hash_map::RandomState,
    slots: Mutex<Box<[Slot]>>,
}

#[derive(Clone, Copy)]
struct Slot {
    hash: u64,
    seen: Option<Instant>,
}

impl Default for HeldKeys {
    fn default() -> Self {
        HeldKeys {
            hasher: Default::default(),
            slots: Mutex::new(
                vec![
                    Slot {
                        hash: 0,
                        seen: None
                    };
                    SLOTS
                ]
                .into_boxed_slice(),
            ),
        }
    }
}

impl HeldKeys {
    /// Whether `key` was found held within [`REMEMBERED_FOR`] before `now`.
    pub fn probably_held(&self, key: &KeyConfig, now: Instant) -> bool {
        let hash = self.hash(key);
        let slots = self.slots();
        let slot = slots[index(hash)];
        slot.hash == hash
            && slot
                .seen
                .is_some_and(|seen| now.saturating_duration_since(seen) < REMEMBERED_FOR)
    }

    /// Remembers that `key` is held (its holder was reused, or a backend was just given it).
    pub fn remember(&self, key: &KeyConfig, now: Instant) {
        let hash = self.hash(key);
        self.slots()[index(hash)] = Slot {
            hash,
            seen: Some(now),
        };
    }

    /// Forgets `key` (the store found it free or expired).
    pub fn forget(&self, key: &KeyConfig) {
        let hash = self.hash(key);
        let mut slots = self.slots();
        let slot = &mut slots[index(hash)];
        if slot.hash == hash {
            slot.seen = None;
        }
    }

    fn hash(&self, key: &KeyConfig) -> u64 {
        self.hasher.hash_one((&key.namespace, &key.name))
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Box<[Slot]>> {
        // The table is a hint: a panic elsewhere while it was locked leaves it usable.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn index(hash: u64) -> usize {
    (hash as usize) & (SLOTS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, name: &str) -> KeyConfig {
        KeyConfig {
            name: name.parse().unwrap(),
            namespace: namespace.into(),
            tag: String::new(),
        }
    }

    #[test]
    fn a_key_is_held_from_remember_until_it_is_forgotten() {
        let keys = HeldKeys::default();
        let now = Instant::now();
        let doc = key("", "doc");
        assert!(!keys.probably_held(&doc, now));
        keys.remember(&doc, now);
        assert!(keys.probably_held(&doc, now));
        keys.forget(&doc);
        assert!(!keys.probably_held(&doc, now));
    }

    #[test]
    fn a_key_not_seen_for_the_remembered_time_is_no_longer_held() {
        let keys = HeldKeys::default();
        let then = Instant::now();
        let doc = key("", "doc");
        keys.remember(&doc, then);
        assert!(keys.probably_held(&doc, then + REMEMBERED_FOR - Duration::from_millis(1)));
        assert!(!keys.probably_held(&doc, then + REMEMBERED_FOR));
        // Seen again: fresh again.
        keys.remember(&doc, then + REMEMBERED_FOR);
        assert!(keys.probably_held(&doc, then + REMEMBERED_FOR));
    }

    #[test]
    fn namespaces_are_told_apart() {
        let keys = HeldKeys::default();
        let now = Instant::now();
        keys.remember(&key("a", "doc"), now);
        assert!(keys.probably_held(&key("a", "doc"), now));
        assert!(!keys.probably_held(&key("b", "doc"), now));
        // Forgetting a key that is not remembered leaves the others alone.
        keys.forget(&key("b", "doc"));
        assert!(keys.probably_held(&key("a", "doc"), now));
    }

    #[test]
    fn more_keys_than_slots_keep_the_table_bounded_and_the_newest_remembered() {
        let keys = HeldKeys::default();
        let now = Instant::now();
        let all: Vec<KeyConfig> = (0..SLOTS * 2).map(|i| key("", &format!("k{i}"))).collect();
        for k in &all {
            keys.remember(k, now);
        }
        // Every slot that a later key took forgot the earlier one; the last key is always there.
        let held = all.iter().filter(|k| keys.probably_held(k, now)).count();
        assert!(held <= SLOTS, "{held} keys held in {SLOTS} slots");
        assert!(keys.probably_held(all.last().unwrap(), now));
    }

    #[test]
    fn a_later_key_of_the_same_slot_replaces_the_earlier_one() {
        let keys = HeldKeys::default();
        let now = Instant::now();
        let first = key("", "k0");
        let slot = index(keys.hash(&first));
        let second = (1..)
            .map(|i| key("", &format!("k{i}")))
            .find(|k| index(keys.hash(k)) == slot)
            .unwrap();
        keys.remember(&first, now);
        keys.remember(&second, now);
        assert!(keys.probably_held(&second, now));
        // The slot now names the second key: the first is not taken for held.
        assert!(!keys.probably_held(&first, now));
        // Forgetting the first leaves the second alone.
        keys.forget(&first);
        assert!(keys.probably_held(&second, now));
    }
}
