//! Whether a soak series grows: a least-squares line through the samples after the warm-up,
//! its slope per hour with a standard error, judged against a growth limit. A slope counts as
//! growth only when it is both over the limit and clearly above the noise (3 standard errors),
//! and only over a window long enough for "per hour" to mean something.

use std::time::Duration;

/// The shortest post-warm-up window whose slopes are judged; shorter runs report them only.
pub const MIN_JUDGED: Duration = Duration::from_secs(600);
/// How many standard errors above zero a slope must be to count as growth.
const SIGNIFICANT: f64 = 3.0;

/// A fitted line: slope and its standard error per hour, the mean, the number of points.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Fit {
    pub slope_per_h: f64,
    pub stderr_per_h: f64,
    pub mean: f64,
    /// The line's value at 0 s (the run's start).
    #[serde(skip)]
    pub intercept: f64,
    pub points: usize,
}

impl Fit {
    pub fn at(&self, seconds: f64) -> f64 {
        self.intercept + self.slope_per_h * seconds / 3600.0
    }
}

/// Least squares through (seconds, value) points; `None` for fewer than 3 points or no
/// spread in time.
pub fn fit(points: &[(f64, f64)]) -> Option<Fit> {
    let n = points.len();
    if n < 3 {
        return None;
    }
    let nf = n as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / nf;
    let my = points.iter().map(|p| p.1).sum::<f64>() / nf;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    let ssr: f64 = points
        .iter()
        .map(|p| (p.1 - my - slope * (p.0 - mx)).powi(2))
        .sum();
    let stderr = (ssr / (nf - 2.0) / sxx).sqrt();
    Some(Fit {
        slope_per_h: slope * 3600.0,
        stderr_per_h: stderr * 3600.0,
        mean: my,
        intercept: my - slope * mx,
        points: n,
    })
}

/// How much a series may grow per hour after the warm-up.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    /// A fraction of the series' post-warm-up mean (RSS: 0.10).
    OfMean(f64),
    /// An absolute amount (fds, tasks: 1).
    Absolute(f64),
}

impl Limit {
    pub fn per_hour(self, mean: f64) -> f64 {
        match self {
            Limit::OfMean(f) => f * mean,
            Limit::Absolute(a) => a,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Flat,
    Growing,
    /// The window after the warm-up is shorter than [`MIN_JUDGED`].
    NotJudged,
}

pub fn judge(fit: &Fit, limit: Limit, window: Duration) -> Verdict {
    if window < MIN_JUDGED {
        return Verdict::NotJudged;
    }
    let over = fit.slope_per_h > limit.per_hour(fit.mean);
    let real = fit.slope_per_h > SIGNIFICANT * fit.stderr_per_h;
    if over && real {
        Verdict::Growing
    } else {
        Verdict::Flat
    }
}

/// The warm-up excluded from the trends: the first 10 % of the run or 60 s, whichever is
/// smaller.
pub fn warmup(duration: Duration) -> Duration {
    (duration / 10).min(Duration::from_secs(60))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn series(slope_per_h: f64, noise: f64) -> Vec<(f64, f64)> {
        (0..720)
            .map(|i| {
                let t = i as f64 * 5.0;
                let wiggle = if i % 2 == 0 { noise } else { -noise };
                (t, 100.0 + slope_per_h * t / 3600.0 + wiggle)
            })
            .collect()
    }

    #[test]
    fn slope_and_mean_of_a_line() {
        let f = fit(&series(12.0, 0.0)).unwrap();
        assert!((f.slope_per_h - 12.0).abs() < 1e-9, "{f:?}");
        assert!(f.stderr_per_h < 1e-9);
        assert!((f.at(3600.0) - 112.0).abs() < 1e-6);
        assert!(fit(&[(0.0, 1.0), (1.0, 2.0)]).is_none());
        assert!(fit(&[(5.0, 1.0), (5.0, 2.0), (5.0, 3.0)]).is_none());
    }

    #[test]
    fn growth_must_exceed_the_limit_and_the_noise() {
        let abs = Limit::Absolute(1.0);
        assert_eq!(
            judge(&fit(&series(0.0, 3.0)).unwrap(), abs, HOUR),
            Verdict::Flat
        );
        assert_eq!(
            judge(&fit(&series(0.5, 0.0)).unwrap(), abs, HOUR),
            Verdict::Flat
        );
        assert_eq!(
            judge(&fit(&series(5.0, 1.0)).unwrap(), abs, HOUR),
            Verdict::Growing
        );
        // 10 % of a mean of ~100 is 10 per hour.
        let rel = Limit::OfMean(0.10);
        assert_eq!(
            judge(&fit(&series(8.0, 0.0)).unwrap(), rel, HOUR),
            Verdict::Flat
        );
        assert_eq!(
            judge(&fit(&series(15.0, 0.5)).unwrap(), rel, HOUR),
            Verdict::Growing
        );
        // A falling series never grows.
        assert_eq!(
            judge(&fit(&series(-20.0, 0.0)).unwrap(), abs, HOUR),
            Verdict::Flat
        );
    }

    #[test]
    fn short_windows_are_not_judged() {
        let f = fit(&series(50.0, 0.0)).unwrap();
        assert_eq!(
            judge(&f, Limit::Absolute(1.0), Duration::from_secs(18)),
            Verdict::NotJudged
        );
    }

    #[test]
    fn warmup_is_a_tenth_up_to_a_minute() {
        assert_eq!(warmup(Duration::from_secs(20)), Duration::from_secs(2));
        assert_eq!(warmup(Duration::from_secs(120)), Duration::from_secs(12));
        assert_eq!(warmup(HOUR), Duration::from_secs(60));
    }
}
