//! What every loop shares about its data order: seeded epoch permutations (optionally grouped
//! by length), the micro-batches of each optimizer step, and how many steps a run plans.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::config::RunSection;

/// The order of examples in `epoch`: a permutation seeded by the run seed and the epoch, so a
/// resumed run sees exactly the same batches. With `lengths`, transformers'
/// `LengthGroupedSampler`: the permutation is cut into mega-batches of 50 batches, each sorted
/// by length (longest first), so a batch holds similar lengths and pads little.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, batch_size: usize, lengths: Option<&[usize]>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    if let Some(lengths) = lengths {
        for mega in order.chunks_mut(50 * batch_size.max(1)) {
            mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    order
}

/// The data order of each epoch, made on first use.
pub struct BatchOrders {
    seed: u64,
    batch_size: usize,
    lengths: Option<Vec<usize>>,
    orders: std::collections::HashMap<u64, Vec<usize>>,
}

impl BatchOrders {
    /// Orders seeded by `seed`; with `lengths`, grouped by length.
    pub fn new(seed: u64, batch_size: usize, lengths: Option<Vec<usize>>) -> Self {
        Self { seed, batch_size, lengths, orders: Default::default() }
    }
}

/// The micro-batches of optimizer step `step` over `items` (steps counted from their first) and
/// the epoch reached at its end. An epoch boundary ends a step early, as transformers' Trainer
/// does.
pub fn micro_batches<'a, T>(
    items: &'a [T],
    step: u64,
    r: &RunSection,
    orders: &mut BatchOrders,
) -> (Vec<Vec<&'a T>>, f64) {
    let micro_per_epoch = items.len().div_ceil(r.batch_size) as u64;
    let mut micro: Vec<Vec<&T>> = Vec::new();
    let mut epoch_of_step = 0f64;
    let per_step = r.micro_per_step() as u64;
    for j in 0..per_step {
        let m = step * per_step + j;
        let epoch = m / micro_per_epoch;
        let within = (m % micro_per_epoch) as usize;
        if j > 0 && within == 0 {
            break;
        }
        let BatchOrders { seed, batch_size, lengths, orders } = orders;
        let order = orders
            .entry(epoch)
            .or_insert_with(|| epoch_order(items.len(), *seed, epoch, *batch_size, lengths.as_deref()));
        let idx = &order[within * r.batch_size..((within + 1) * r.batch_size).min(items.len())];
        micro.push(idx.iter().map(|&i| &items[i]).collect());
        epoch_of_step = (m + 1) as f64 / micro_per_epoch as f64;
    }
    (micro, epoch_of_step)
}

/// Optimizer steps of a run over `n` examples: `run.max_steps`, else `run.epochs` passes.
pub fn planned_steps(n: usize, r: &RunSection) -> u64 {
    r.max_steps.unwrap_or(steps_for_epochs(n, r, r.epochs as u64))
}

/// Optimizer steps of `epochs` passes over `n` examples in `r.batch_size` micro-batches,
/// `r.grad_accum` to a step on each of `r.ranks` ranks.
pub fn steps_for_epochs(n: usize, r: &RunSection, epochs: u64) -> u64 {
    (n.div_ceil(r.batch_size) as u64).div_ceil(r.micro_per_step() as u64) * epochs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation_and_groups_by_length() {
        let a = epoch_order(10, 1, 0, 2, None);
        assert_eq!(a, epoch_order(10, 1, 0, 2, None));
        assert_ne!(a, epoch_order(10, 1, 1, 2, None), "each epoch reshuffles");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let lengths: Vec<usize> = (0..120).map(|i| (i * 37) % 101).collect();
        let grouped = epoch_order(120, 1, 0, 1, Some(&lengths));
        // Mega-batches of 50: each sorted longest first.
        for mega in grouped.chunks(50) {
            assert!(mega.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        let mut all = grouped.clone();
        all.sort();
        assert_eq!(all, (0..120).collect::<Vec<_>>());
    }
}
