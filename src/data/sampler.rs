//! Seeded batch samplers: shuffled mini-batches, and class-pure batches with ghosts.

use rand::{Rng, SeedableRng, seq::SliceRandom};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::trace::MAX_CLASSES;

/// Shuffled mini-batches: every epoch a fresh seeded permutation, cut into batches.
///
/// The permutation of epoch `e` depends only on `(seed, e)`, so dropping examples
/// (`epoch_without`) keeps the order of the rest: the deletion experiments
/// retrain on "the same data order minus the removed examples".
#[derive(Clone, Debug)]
pub struct ShuffledSampler {
    n: usize,
    batch: usize,
    seed: u64,
}

impl ShuffledSampler {
    /// Batches of `batch` over `n` examples.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero batch size or no examples.
    pub fn new(n: usize, batch: usize, seed: u64) -> Result<Self> {
        if batch == 0 || n == 0 {
            return Err(Error::InvalidConfig {
                what: "sampler",
                reason: format!("needs batch > 0 and examples, found batch {batch}, {n} examples"),
            });
        }
        Ok(Self { n, batch, seed })
    }

    /// The batches (row indices) of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.epoch_without(epoch, &[])
    }

    /// The batches of epoch `epoch` with rows `removed` left out.
    pub fn epoch_without(&self, epoch: u64, removed: &[usize]) -> Vec<Vec<usize>> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut order: Vec<usize> = (0..self.n).collect();
        order.shuffle(&mut rng);
        let drop: std::collections::HashSet<usize> = removed.iter().copied().collect();
        let kept: Vec<usize> = order.into_iter().filter(|i| !drop.contains(i)).collect();
        kept.chunks(self.batch).map(<[usize]>::to_vec).collect()
    }
}

/// One class-pure batch: members of one class, and ghosts from other classes
/// (forwarded, no loss).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassPureBatch {
    /// The class.
    pub class: usize,
    /// Rows carrying the loss, all of `class`.
    pub members: Vec<usize>,
    /// Ghost rows from other classes.
    pub ghosts: Vec<usize>,
}

impl ClassPureBatch {
    /// Members then ghosts, the row order of the batch.
    pub fn rows(&self) -> Vec<usize> {
        self.members.iter().chain(&self.ghosts).copied().collect()
    }
    /// `true` for ghost rows, in [`rows`](Self::rows) order.
    pub fn ghost_mask(&self) -> Vec<bool> {
        self.members
            .iter()
            .map(|_| false)
            .chain(self.ghosts.iter().map(|_| true))
            .collect()
    }
}

/// Class-pure batches (the paper's protocol): each epoch, each class's examples
/// are shuffled and cut into batches; batches are interleaved in a seeded order.
#[derive(Clone, Debug)]
pub struct ClassPureSampler {
    labels: Vec<usize>,
    batch: usize,
    ghosts: usize,
    seed: u64,
}

impl ClassPureSampler {
    /// Batches of `batch` members plus `ghosts` ghosts.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a zero batch size or no labels.
    pub fn new(labels: &[usize], batch: usize, ghosts: usize, seed: u64) -> Result<Self> {
        if let Some(&label) = labels.iter().find(|&&c| c >= MAX_CLASSES) {
            return Err(Error::LabelOutOfRange {
                op: "ClassPureSampler::new",
                label,
                n_classes: MAX_CLASSES,
            });
        }
        if batch == 0 || labels.is_empty() {
            return Err(Error::InvalidConfig {
                what: "class-pure sampler",
                reason: format!(
                    "needs batch > 0 and labels, found batch {batch}, {} labels",
                    labels.len()
                ),
            });
        }
        Ok(Self {
            labels: labels.to_vec(),
            batch,
            ghosts,
            seed,
        })
    }

    /// The batches of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> Vec<ClassPureBatch> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let n_classes = self.labels.iter().max().map_or(0, |m| m + 1);
        let mut out = Vec::new();
        for c in 0..n_classes {
            let mut idx: Vec<usize> = (0..self.labels.len())
                .filter(|&i| self.labels[i] == c)
                .collect();
            idx.shuffle(&mut rng);
            let others: Vec<usize> = (0..self.labels.len())
                .filter(|&i| self.labels[i] != c)
                .collect();
            for members in idx.chunks(self.batch) {
                let ghosts = if others.is_empty() {
                    Vec::new()
                } else {
                    (0..self.ghosts)
                        .map(|_| others[rng.random_range(0..others.len())])
                        .collect::<Vec<_>>()
                };
                let mut g = ghosts;
                g.sort_unstable();
                g.dedup();
                out.push(ClassPureBatch {
                    class: c,
                    members: members.to_vec(),
                    ghosts: g,
                });
            }
        }
        out.shuffle(&mut rng);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_epochs_cover_every_example_once_and_removal_keeps_order() {
        let s = ShuffledSampler::new(10, 3, 1).unwrap();
        let all: Vec<usize> = s.epoch(0).concat();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(s.epoch(0), s.epoch(1));
        let without: Vec<usize> = s.epoch_without(0, &[all[0], all[5]]).concat();
        let expected: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| i != all[0] && i != all[5])
            .collect();
        assert_eq!(without, expected);
    }

    #[test]
    fn class_pure_batches_hold_one_class_and_foreign_ghosts() {
        let labels: Vec<usize> = (0..30).map(|i| i % 3).collect();
        let s = ClassPureSampler::new(&labels, 4, 2, 5).unwrap();
        let batches = s.epoch(0);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.members.clone()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..30).collect::<Vec<_>>());
        for b in &batches {
            assert!(b.members.iter().all(|&i| labels[i] == b.class));
            assert!(b.ghosts.iter().all(|&i| labels[i] != b.class) && !b.ghosts.is_empty());
            assert_eq!(b.rows().len(), b.ghost_mask().len());
        }
    }
}
