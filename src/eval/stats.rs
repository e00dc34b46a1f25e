//! Win-rate statistics: wins/ties/losses, a seeded bootstrap interval, and a length-controlled
//! win-rate in the spirit of AlpacaEval 2 (the judge's preference regressed on the length
//! difference, read off at zero difference).

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::judge::Outcome;

/// The summary of a set of comparisons.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WinRate {
    /// Comparisons won.
    pub wins: usize,
    /// Comparisons tied.
    pub ties: usize,
    /// Comparisons lost.
    pub losses: usize,
    /// (wins + ties / 2) / comparisons.
    pub win_rate: f64,
    /// 95% percentile-bootstrap interval of the win-rate.
    pub ci95: (f64, f64),
}

/// Bootstrap resamples behind [`WinRate::ci95`].
pub const BOOTSTRAP_SAMPLES: usize = 2000;

/// Win-rate of `outcomes` with a 95% bootstrap interval from `seed`. Every number is finite and
/// never -0.0: with no outcomes there is no evidence either way, a rate of ½ in [0, 1].
pub fn win_rate(outcomes: &[Outcome], seed: u64) -> WinRate {
    let count = |o: Outcome| outcomes.iter().filter(|&&x| x == o).count();
    let n = outcomes.len();
    let scores: Vec<f64> = outcomes.iter().map(|o| o.score()).collect();
    // A fold from +0.0: an empty `sum()` of f64 is -0.0.
    let mean = |xs: &mut dyn Iterator<Item = f64>| xs.fold(0.0, |a, b| a + b) / n.max(1) as f64;
    let rate = if n == 0 { 0.5 } else { mean(&mut scores.iter().copied()) };
    let ci95 = if n == 0 {
        (0.0, 1.0)
    } else {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut rates: Vec<f64> =
            (0..BOOTSTRAP_SAMPLES).map(|_| mean(&mut (0..n).map(|_| scores[rng.random_range(0..n)]))).collect();
        rates.sort_by(f64::total_cmp);
        (percentile(&rates, 0.025), percentile(&rates, 0.975))
    };
    WinRate { wins: count(Outcome::Win), ties: count(Outcome::Tie), losses: count(Outcome::Loss), win_rate: rate, ci95 }
}

/// Linear interpolation between closest ranks of sorted `xs` (NumPy's default percentile).
fn percentile(xs: &[f64], q: f64) -> f64 {
    let pos = q * (xs.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    xs[lo] + (xs[hi] - xs[lo]) * (pos - lo as f64)
}

/// Length-controlled win-rate: fit `P(model preferred) = σ(b₀ + b₁ · tanh(Δ / s))` to the
/// outcomes (ties as ½) by Newton's method, where Δ is the model's output length minus the
/// baseline's and `s` their standard deviation, and return `σ(b₀)`: the win-rate the judge would
/// give at equal lengths. Equal lengths everywhere give the plain win-rate. Always finite: ½
/// with no outcomes, the plain win-rate should the fit not converge to a number.
pub fn length_controlled_win_rate(outcomes: &[Outcome], length_differences: &[f64]) -> f64 {
    let n = outcomes.len();
    if n == 0 {
        return 0.5;
    }
    let lc = fit_length_control(outcomes, length_differences);
    if lc.is_finite() {
        lc + 0.0
    } else {
        outcomes.iter().map(|o| o.score()).fold(0.0, |a, b| a + b) / n as f64
    }
}

fn fit_length_control(outcomes: &[Outcome], length_differences: &[f64]) -> f64 {
    let n = outcomes.len();
    let mean_d = length_differences.iter().sum::<f64>() / n as f64;
    let sd = (length_differences.iter().map(|d| (d - mean_d).powi(2)).sum::<f64>() / n as f64).sqrt();
    let x: Vec<f64> = length_differences.iter().map(|d| if sd > 0.0 { (d / sd).tanh() } else { 0.0 }).collect();
    let y: Vec<f64> = outcomes.iter().map(|o| o.score()).collect();
    // A whisper of L2 on both weights keeps all-win / all-loss data finite.
    let ridge = 1e-6;
    let (mut b0, mut b1) = (0.0f64, 0.0f64);
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (ridge * b0, ridge * b1, ridge, 0.0, ridge);
        for (xi, yi) in x.iter().zip(&y) {
            let p = 1.0 / (1.0 + (-(b0 + b1 * xi)).exp());
            let w = p * (1.0 - p);
            g0 += p - yi;
            g1 += (p - yi) * xi;
            h00 += w;
            h01 += w * xi;
            h11 += w * xi * xi;
        }
        let det = h00 * h11 - h01 * h01;
        let (d0, d1) = ((h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det);
        b0 -= d0;
        b1 -= d1;
        if d0.abs().max(d1.abs()) < 1e-12 {
            break;
        }
    }
    1.0 / (1.0 + (-b0).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn ties_count_half_and_the_interval_brackets_the_rate() {
        let outcomes = [Win, Win, Win, Tie, Loss, Win, Tie, Loss, Win, Win];
        let w = win_rate(&outcomes, 0);
        assert_eq!((w.wins, w.ties, w.losses), (6, 2, 2));
        assert!((w.win_rate - 0.7).abs() < 1e-12);
        assert!(w.ci95.0 < 0.7 && 0.7 < w.ci95.1, "{:?}", w.ci95);
        // Standard error √(var/n) with var = mean((s − 0.7)²) = 0.16: half-width ≈ 1.96 · 0.126.
        let half = (w.ci95.1 - w.ci95.0) / 2.0;
        assert!((half - 1.96 * (0.16f64 / 10.0).sqrt()).abs() < 0.05, "{half}");
        assert_eq!(win_rate(&outcomes, 0), w, "seeded");
        let all = win_rate(&[Win; 5], 1);
        assert_eq!((all.win_rate, all.ci95), (1.0, (1.0, 1.0)));
    }

    #[test]
    fn no_outcomes_give_finite_numbers_and_never_negative_zero() {
        let w = win_rate(&[], 3);
        assert_eq!((w.wins, w.ties, w.losses), (0, 0, 0));
        assert_eq!((w.win_rate, w.ci95), (0.5, (0.0, 1.0)));
        assert_eq!(length_controlled_win_rate(&[], &[]), 0.5);
        let all_lost = win_rate(&[Loss; 3], 0);
        for x in [all_lost.win_rate, all_lost.ci95.0, all_lost.ci95.1] {
            assert!(x == 0.0 && x.is_sign_positive(), "{x:?}");
        }
        let lc = length_controlled_win_rate(&[Loss; 3], &[1.0, -2.0, 5.0]);
        assert!(lc.is_finite() && lc.is_sign_positive(), "{lc}");
        let json = serde_json::to_string(&w).unwrap();
        assert!(!json.contains("null") && !json.contains("-0"), "{json}");
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        assert!((percentile(&[1.0, 2.0, 3.0, 4.0], 0.5) - 2.5).abs() < 1e-12);
        assert!((percentile(&[0.0, 10.0], 0.025) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn length_control_reads_the_rate_at_zero_length_difference() {
        // Equal lengths: the plain win-rate.
        let outcomes = [Win, Loss, Tie, Win];
        assert!((length_controlled_win_rate(&outcomes, &[0.0; 4]) - 0.625).abs() < 1e-6);
        // Longer answers win 4 of 5, shorter ones 2 of 5: with two length groups the fit is
        // saturated, σ(b₀ ± b₁) = 0.8 / 0.4, so b₀ = (logit 0.8 + logit 0.4) / 2 and the
        // length-controlled rate is σ(0.490415) = 0.620204 (the raw rate is 0.6).
        let outcomes = [Win, Win, Win, Win, Loss, Win, Win, Loss, Loss, Loss];
        let diffs = [30.0, 30.0, 30.0, 30.0, 30.0, -30.0, -30.0, -30.0, -30.0, -30.0];
        let lc = length_controlled_win_rate(&outcomes, &diffs);
        assert!((lc - 0.620_204).abs() < 1e-5, "{lc}");
        // A model that only wins by being longer is pulled back toward ½.
        let outcomes = [Win, Win, Win, Win, Tie, Tie, Tie, Loss];
        let diffs = [40.0, 35.0, 50.0, 45.0, 0.0, 0.0, 0.0, -5.0];
        let raw = win_rate(&outcomes, 0).win_rate;
        assert!(length_controlled_win_rate(&outcomes, &diffs) < raw);
    }
}
