//! A bounded cache of metadata clusters (L2 tables, refcount blocks), keyed by host offset.
//!
//! The cache is write-through: every change is written to the file at once, so entries are never
//! dirty and eviction is free. Memory stays under the budget whatever the image size.

use std::collections::HashMap;

/// Clusters held by the host offset they were read from. Every cluster a read or write maps
/// looks its L2 table up here, so the hash is foldhash's (seeded per map, about ten times
/// cheaper than the standard SipHash on these keys).
#[derive(Debug)]
pub struct TableCache {
    map: HashMap<u64, (Vec<u8>, u64), foldhash::fast::RandomState>,
    budget: usize,
    used: usize,
    tick: u64,
}

impl TableCache {
    /// A cache holding at most `budget` bytes (and always at least one table).
    pub fn new(budget: usize) -> Self {
        TableCache {
            map: HashMap::default(),
            budget,
            used: 0,
            tick: 0,
        }
    }

    /// The table at `offset`, if cached.
    pub fn get(&mut self, offset: u64) -> Option<&mut Vec<u8>> {
        self.tick += 1;
        let tick = self.tick;
        self.map.get_mut(&offset).map(|e| {
            e.1 = tick;
            &mut e.0
        })
    }

    /// Inserts a table, evicting the least recently used quarter when over budget.
    pub fn insert(&mut self, offset: u64, table: Vec<u8>) {
        self.tick += 1;
        self.used += table.len();
        if let Some((old, _)) = self.map.insert(offset, (table, self.tick)) {
            self.used -= old.len();
        }
        if self.used > self.budget && self.map.len() > 1 {
            let mut ticks: Vec<u64> = self.map.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 4];
            let used = &mut self.used;
            self.map.retain(|_, e| {
                let keep = e.1 > cut;
                if !keep {
                    *used -= e.0.len();
                }
                keep
            });
        }
    }

    /// Forgets the table at `offset` (it was freed or moved).
    /// How many lookups and insertions the cache has served.
    #[cfg(test)]
    pub fn accesses(&self) -> u64 {
        self.tick
    }

    pub fn remove(&mut self, offset: u64) {
        if let Some((old, _)) = self.map.remove(&offset) {
            self.used -= old.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_over_budget_evicts_oldest() {
        let mut c = TableCache::new(4096);
        for i in 0..8u64 {
            c.insert(i * 1024, vec![0u8; 1024]);
        }
        assert!(c.used <= 4096);
        assert!(c.get(7 * 1024).is_some());
        assert!(c.get(0).is_none());
    }
}
