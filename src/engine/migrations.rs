//! The embedded, ordered migration chain that defines the state schema.

use sha2::{Digest, Sha256};

/// One schema step. Applied with `search_path` set to the store schema, so its SQL is unqualified.
#[derive(Clone, Debug)]
pub struct Migration {
    pub version: i32,
    pub description: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// Hex sha256 of the SQL text; recorded in `state_versions` and compared on every run.
    pub fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }
}

/// An ordered chain of migrations with versions 1..=n. The engine takes the chain as a value
/// so that tests can exercise the exact same code with a chain that fails on purpose.
#[derive(Clone, Debug)]
pub struct MigrationChain {
    steps: Vec<Migration>,
}

impl MigrationChain {
    /// Panics on a malformed chain: only ever built from compile-time constants and tests.
    pub fn new(steps: Vec<Migration>) -> Self {
        for (i, step) in steps.iter().enumerate() {
            assert_eq!(
                step.version as usize,
                i + 1,
                "migration versions must be 1..=n in order"
            );
        }
        Self { steps }
    }

    /// The chain this binary ships.
    pub fn shipped() -> Self {
        Self::new(vec![
            Migration {
                version: 1,
                description: "core tables",
                sql: include_str!("migrations/0001_core_tables.sql"),
            },
            Migration {
                version: 2,
                description: "history tables",
                sql: include_str!("migrations/0002_history_tables.sql"),
            },
            Migration {
                version: 3,
                description: "intervals and indexes",
                sql: include_str!("migrations/0003_intervals_and_indexes.sql"),
            },
        ])
    }

    pub fn latest(&self) -> i32 {
        self.steps.len() as i32
    }

    pub fn get(&self, version: i32) -> Option<&Migration> {
        usize::try_from(version - 1)
            .ok()
            .and_then(|i| self.steps.get(i))
    }

    /// The steps strictly after `from` up to and including `to`.
    pub fn between(&self, from: i32, to: i32) -> impl Iterator<Item = &Migration> {
        self.steps
            .iter()
            .filter(move |m| m.version > from && m.version <= to)
    }

    pub fn steps(&self) -> &[Migration] {
        &self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_chain_has_several_distinct_steps() {
        let chain = MigrationChain::shipped();
        assert!(chain.latest() >= 3);
        let mut sums: Vec<_> = chain.steps().iter().map(Migration::checksum).collect();
        sums.dedup();
        assert_eq!(sums.len(), chain.steps().len());
        assert_eq!(
            chain.between(1, 3).map(|m| m.version).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
}
