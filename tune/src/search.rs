//! The search over a site's space: start from the default, then descend
//! coordinate by coordinate in each family, most promising family first,
//! until no single-parameter change helps or the deadline passes.
//!
//! A variant's **score** is the mean over the timed row counts of its
//! time divided by the default's (so a decode GEMV and a prefill GEMM
//! count alike), plus a heavy penalty for every row count on which it is
//! slower than the default by more than [`TIE`]: the winner must be no
//! slower than the default anywhere. Times within [`TIE`] of each other
//! count as equal, because many parameters change one row count's code
//! only (how a single-row tile splits `k`, its streams and prefetches),
//! and a strict comparison then rejected such a variant whenever the
//! unchanged count happened to time a little slower. A change is taken
//! only when it improves the score by at least [`MIN_GAIN`], which keeps
//! the search from chasing noise; the winner is re-timed next to the
//! default before it is kept.
//!
//! Coordinate descent finds the optimum of a cost that is separable in
//! the parameters (as tile sizes mostly are) and a good local optimum
//! otherwise; it is anytime: whatever it has measured when the deadline
//! passes is a valid answer.

use std::collections::HashMap;
use std::time::Instant;

use smelt_codegen::tuning::{Site, Space, Variant};

use crate::measure::Outcome;

/// The smallest relative improvement of the score a step must bring.
pub const MIN_GAIN: f64 = 0.01;
/// The score's penalty per unit of slowdown against the default.
const PENALTY: f64 = 10.0;
/// Relative differences of time this small are noise, not a slowdown.
pub const TIE: f64 = 0.005;

/// What a search found.
#[derive(Clone, Debug)]
pub struct Found {
    pub default: Variant,
    pub default_times: Vec<f64>,
    pub best: Variant,
    pub best_times: Vec<f64>,
    /// Distinct variants evaluated (checked, and timed when correct).
    pub evaluated: usize,
    /// Variants with a wrong result, and why.
    pub rejected: Vec<(Variant, String)>,
    /// Variants that could not be built, and why.
    pub failed: Vec<(Variant, String)>,
    /// Whether the search ended by itself (not by the deadline).
    pub complete: bool,
}

/// Why there is nothing to search.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SearchError {
    #[error("the default variant `{variant}` is wrong: {why}")]
    DefaultWrong { variant: String, why: String },
    #[error("the default variant `{variant}` cannot be built: {why}")]
    DefaultFailed { variant: String, why: String },
}

/// The score of `t` against the default's times `d` (lower is better).
pub fn score(t: &[f64], d: &[f64]) -> f64 {
    let ratios: Vec<f64> = t.iter().zip(d).map(|(t, d)| t / d.max(1e-12)).collect();
    let mean = ratios.iter().sum::<f64>() / ratios.len().max(1) as f64;
    mean + PENALTY * ratios.iter().map(|r| (r - 1.0 - TIE).max(0.0)).sum::<f64>()
}

/// Whether `t` is no slower than `d` (by more than [`TIE`]) at any row
/// count.
pub fn no_slower(t: &[f64], d: &[f64]) -> bool {
    t.iter().zip(d).all(|(t, d)| *t <= d * (1.0 + TIE))
}

struct State<'a> {
    eval: &'a mut dyn FnMut(&Variant) -> Outcome,
    seen: HashMap<Variant, Option<Vec<f64>>>,
    found: Found,
    best_score: f64,
    deadline: Instant,
}

impl State<'_> {
    fn late(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The times of `v` (evaluated once), `None` when it is wrong or
    /// failed.
    fn times(&mut self, v: &Variant) -> Option<Vec<f64>> {
        if let Some(t) = self.seen.get(v) {
            return t.clone();
        }
        self.found.evaluated += 1;
        let t = match (self.eval)(v) {
            Outcome::Timed(t) => Some(t),
            Outcome::Wrong(why) => {
                self.found.rejected.push((*v, why));
                None
            }
            Outcome::Failed(why) => {
                self.found.failed.push((*v, why));
                None
            }
        };
        self.seen.insert(*v, t.clone());
        t
    }

    /// Makes `v` (of score `s`) the best when it is no slower than the
    /// default anywhere and better than the best by [`MIN_GAIN`].
    fn consider(&mut self, v: &Variant, s: f64, on_best: &mut dyn FnMut(&Found)) {
        let Some(Some(t)) = self.seen.get(v) else { return };
        if no_slower(t, &self.found.default_times) && s < self.best_score * (1.0 - MIN_GAIN) {
            self.best_score = s;
            self.found.best = *v;
            self.found.best_times = t.clone();
            on_best(&self.found);
        }
    }

    fn score(&mut self, v: &Variant) -> f64 {
        match self.times(v) {
            Some(t) => score(&t, &self.found.default_times),
            None => f64::INFINITY,
        }
    }
}

/// Searches `space` from `default` until done or `deadline`; `eval` checks
/// and times a variant (see [`Evaluate::evaluate`](crate::measure::Evaluate::evaluate)), and
/// `on_best` is told each new best variant.
pub fn search(
    site: &Site,
    space: &Space,
    default: Variant,
    deadline: Instant,
    eval: &mut dyn FnMut(&Variant) -> Outcome,
    on_best: &mut dyn FnMut(&Found),
) -> Result<Found, SearchError> {
    let default_times = match eval(&default) {
        Outcome::Timed(t) => t,
        Outcome::Wrong(why) => return Err(SearchError::DefaultWrong { variant: default.to_string(), why }),
        Outcome::Failed(why) => return Err(SearchError::DefaultFailed { variant: default.to_string(), why }),
    };
    let found = Found {
        default,
        default_times: default_times.clone(),
        best: default,
        best_times: default_times.clone(),
        evaluated: 1,
        rejected: vec![],
        failed: vec![],
        complete: false,
    };
    let mut st =
        State { eval, seen: HashMap::from([(default, Some(default_times))]), found, best_score: 1.0, deadline };
    // Every family's starting point, then the families best first (the
    // default's family first on ties).
    let home = space.locate(&default).map(|(f, _)| f);
    let mut starts: Vec<(usize, Vec<usize>, f64)> = vec![];
    let mut interrupted = false;
    for (fi, fam) in space.families.iter().enumerate() {
        if st.late() {
            interrupted = true;
            break;
        }
        let p = match (home, space.locate(&default)) {
            (Some(h), Some((_, p))) if h == fi => p,
            _ => site.start(fam),
        };
        let v = fam.variant(&p);
        let s = st.score(&v);
        st.consider(&v, s, on_best);
        starts.push((fi, p, s));
    }
    starts.sort_by(|a, b| a.2.total_cmp(&b.2).then((Some(a.0) != home).cmp(&(Some(b.0) != home))));
    'families: for (fi, start, s) in starts {
        if !s.is_finite() {
            continue;
        }
        let fam = &space.families[fi];
        let mut cur = start;
        let mut cur_score = s;
        loop {
            let mut improved = false;
            for axis in 0..fam.axes.len() {
                for val in 0..fam.axes[axis].values.len() {
                    if val == cur[axis] {
                        continue;
                    }
                    if st.late() {
                        interrupted = true;
                        break 'families;
                    }
                    let mut p = cur.clone();
                    p[axis] = val;
                    let v = fam.variant(&p);
                    let s = st.score(&v);
                    st.consider(&v, s, on_best);
                    if s < cur_score * (1.0 - MIN_GAIN) {
                        cur = p;
                        cur_score = s;
                        improved = true;
                    }
                }
            }
            if !improved {
                break;
            }
        }
    }
    st.found.complete = !interrupted;
    Ok(st.found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_codegen::kir::Scalar;
    use smelt_codegen::select::PanelParams;
    use smelt_codegen::tuning::{GpuParams, Lowering, GPU_AXES};
    use std::time::Duration;

    fn site() -> Site {
        Site::weight_product(64, 32, None, Scalar::F32).unwrap()
    }

    /// A cost separable in the panel parameters with its minimum at
    /// mr=3 nr=12 ksplit=2 fma=1 streams=4; the rows family is slower
    /// everywhere.
    fn cost(v: &Variant, m: usize) -> f64 {
        let base = if m == 1 { 1e-5 } else { 1e-3 };
        match v {
            Variant::Panels { p, .. } => {
                let d = (p.mr as f64 - 3.0).abs()
                    + (p.nr as f64 - 12.0).abs() / 4.0
                    + (p.ksplit as f64 - 2.0).abs()
                    + (!p.fma) as u8 as f64
                    + (p.streams as f64 - 4.0).abs() / 2.0;
                base * (1.0 + 0.05 * d)
            }
            Variant::Rows { .. } | Variant::Gpu { .. } | Variant::Cublas => base * 3.0,
        }
    }

    /// The GPU optimum of [`gpu_cost`].
    const GPU_BEST: GpuParams =
        GpuParams { threads: 128, wpg: 2, rpg: 4, unroll: 2, mtile: 2, gemv_max_m: 16, tile: 1, bk: 64, bps: 8 };

    /// A cost separable in the GPU axes (distance in value-index steps),
    /// with its minimum at [`GPU_BEST`].
    fn gpu_cost(v: &Variant, m: usize) -> f64 {
        let Variant::Gpu { p } = v else { return 1.0 };
        let index = |axis: usize, x: usize| GPU_AXES[axis].1.iter().position(|&y| y == x).unwrap() as f64;
        let d: f64 = p
            .values()
            .iter()
            .zip(GPU_BEST.values())
            .enumerate()
            .map(|(a, (x, b))| (index(a, *x) - index(a, b)).abs())
            .sum();
        (if m == 1 { 1e-6 } else { 1e-4 }) * (1.0 + 0.05 * d)
    }

    #[test]
    fn finds_the_optimum_of_the_gpu_space() {
        let s = Site::gpu_weight_product(960, 576, Some("silu"), Scalar::BF16).unwrap();
        let space = s.space(&[]);
        let default = s.default_variant(false, &[]);
        assert_ne!(default, Variant::Gpu { p: GPU_BEST });
        let mut eval = |v: &Variant| Outcome::Timed(vec![gpu_cost(v, 1), gpu_cost(v, 128)]);
        let f = search(&s, &space, default, Instant::now() + Duration::from_secs(60), &mut eval, &mut |_| {}).unwrap();
        assert_eq!(f.best, Variant::Gpu { p: GPU_BEST });
        assert!(f.complete && f.evaluated < space.len() / 100, "{} of {}", f.evaluated, space.len());
    }

    #[test]
    fn finds_the_optimum_of_a_separable_cost() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        let default = s.default_variant(true, &[Lowering::Cranelift]);
        let mut eval = |v: &Variant| Outcome::Timed(vec![cost(v, 1), cost(v, 128)]);
        let mut bests = 0;
        let f = search(&s, &space, default, Instant::now() + Duration::from_secs(60), &mut eval, &mut |_| bests += 1)
            .unwrap();
        let want = Variant::Panels {
            p: PanelParams { mr: 3, nr: 12, ksplit: 2, fma: true, lanes: 4, streams: 4, prefetch: 0 },
            lowering: Lowering::Cranelift,
        };
        assert_eq!(f.best, want);
        assert!(f.complete && bests > 0);
        assert!(f.evaluated < space.len() / 4, "{} of {}", f.evaluated, space.len());
    }

    #[test]
    fn a_past_deadline_keeps_the_default() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        let default = s.default_variant(true, &[Lowering::Cranelift]);
        let mut eval = |v: &Variant| Outcome::Timed(vec![cost(v, 1)]);
        let f = search(&s, &space, default, Instant::now(), &mut eval, &mut |_| {}).unwrap();
        assert_eq!((f.best, f.evaluated, f.complete), (default, 1, false));
    }

    #[test]
    fn a_variant_slower_on_one_row_count_does_not_win() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        let default = s.default_variant(true, &[Lowering::Cranelift]);
        // Twice as fast on prefill, 1% slower on decode: not taken.
        let mut eval = |v: &Variant| {
            let d = *v == default;
            Outcome::Timed(vec![if d { 1.0 } else { 1.01 }, if d { 1.0 } else { 0.5 }])
        };
        let f = search(&s, &space, default, Instant::now() + Duration::from_secs(60), &mut eval, &mut |_| {}).unwrap();
        assert_eq!(f.best, default);
    }

    #[test]
    fn a_gain_at_one_row_count_wins_over_noise_at_the_other() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        let default = s.default_variant(true, &[Lowering::Cranelift]);
        // 5% faster on decode, prefill 0.3% slower (its code unchanged,
        // the timing noisy): taken.
        let mut eval = |v: &Variant| {
            let d = *v == default;
            Outcome::Timed(vec![if d { 1.0 } else { 0.95 }, if d { 1.0 } else { 1.003 }])
        };
        let f = search(&s, &space, default, Instant::now() + Duration::from_secs(60), &mut eval, &mut |_| {}).unwrap();
        assert_ne!(f.best, default);
    }

    #[test]
    fn a_wrong_default_is_an_error() {
        let s = site();
        let space = s.space(&[Lowering::Cranelift]);
        let default = s.default_variant(true, &[Lowering::Cranelift]);
        let mut eval = |_: &Variant| Outcome::Wrong("bad".into());
        let e = search(&s, &space, default, Instant::now(), &mut eval, &mut |_| {}).unwrap_err();
        assert!(matches!(e, SearchError::DefaultWrong { .. }));
    }
}
