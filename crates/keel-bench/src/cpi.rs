//! The latencies the Cloud Foundry BOSH AWS CPI's operators published (`keel-bench waits
//! --cpi`), and their fit as heavy-tailed distributions for the wait simulation (`waits.rs`).

use serde::Serialize;

use crate::waits::{Outliers, Readiness};

/// An operation's latency as the Cloud Foundry BOSH AWS CPI's operators published it: count,
/// min, mean, max and standard deviation over every sample, and the worst outliers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Published {
    pub operation: &'static str,
    pub count: u32,
    pub min_s: f64,
    pub mean_s: f64,
    pub max_s: f64,
    pub sigma_s: f64,
    /// The worst outliers, in milliseconds.
    pub outliers_ms: &'static [f64],
    /// Where the CPI's lesson stops waiting and creates anew, if it names a deadline.
    pub recreate_at_s: Option<f64>,
}

/// The CPI's published figures (seconds; outliers in ms).
pub(crate) const CPI: [Published; 4] = [
    Published {
        operation: "create instance (to running)",
        count: 2_599,
        min_s: 16.6,
        mean_s: 29.9,
        max_s: 348.9,
        sigma_s: 9.85,
        outliers_ms: &[
            84_000.0, 86_000.0, 87_000.0, 88_000.0, 91_000.0, 101_000.0, 102_000.0, 102_000.0,
            197_000.0, 348_900.0,
        ],
        recreate_at_s: Some(60.0),
    },
    Published {
        operation: "delete instance",
        count: 2_597,
        min_s: 31.3,
        mean_s: 49.2,
        max_s: 173.0,
        sigma_s: 13.6,
        outliers_ms: &[
            154_000.0, 154_000.0, 154_000.0, 154_000.0, 154_000.0, 156_000.0, 156_000.0, 157_000.0,
            160_000.0, 173_000.0,
        ],
        recreate_at_s: None,
    },
    Published {
        operation: "create volume (to available)",
        count: 1_015,
        min_s: 0.09,
        mean_s: 2.02,
        max_s: 158.1,
        sigma_s: 8.73,
        outliers_ms: &[156_000.0, 156_000.0, 158_100.0],
        recreate_at_s: Some(10.0),
    },
    Published {
        operation: "attach volume",
        count: 1_015,
        min_s: 8.7,
        mean_s: 13.6,
        max_s: 1_583.6,
        sigma_s: 51.1,
        outliers_ms: &[65_000.0, 81_000.0, 101_000.0, 419_000.0, 1_583_600.0],
        recreate_at_s: None,
    },
];

impl Published {
    /// The published figures fitted as a heavy-tailed distribution: the outliers as
    /// published, at their own rate, and a log-normal body above the minimum whose mean and
    /// standard deviation are what the published ones leave once the outliers' share of the
    /// sums is taken out (so that body and outliers together have the published mean and
    /// sigma). A body sigma that would come out below 2% of its mean is held there.
    pub(crate) fn fitted(&self) -> Readiness {
        let n = f64::from(self.count);
        let k = self.outliers_ms.len() as f64;
        let (mean, sigma) = (self.mean_s * 1000.0, self.sigma_s * 1000.0);
        let sum: f64 = self.outliers_ms.iter().sum();
        let squares: f64 = self.outliers_ms.iter().map(|x| x * x).sum();
        let body_mean = (n * mean - sum) / (n - k);
        let body_square = (n * (sigma * sigma + mean * mean) - squares) / (n - k);
        let body_sigma = (body_square - body_mean * body_mean)
            .max(0.0)
            .sqrt()
            .max(body_mean * 0.02);
        Readiness {
            what: self.operation,
            mean_ms: body_mean,
            sigma_ms: body_sigma,
            min_ms: self.min_s * 1000.0,
            outliers: Outliers::Published {
                values_ms: self.outliers_ms,
                count: self.count,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    /// Each published operation's fit draws what was published: no time below the minimum,
    /// the published worst as its maximum, and the published mean and sigma (body and
    /// outliers together).
    #[test]
    fn the_fitted_cpi_distributions_have_the_published_figures() {
        let mut rng = StdRng::seed_from_u64(11);
        for published in &CPI {
            let fitted = published.fitted();
            let draws: Vec<f64> = (0..400_000).map(|_| fitted.draw(&mut rng)).collect();
            let n = draws.len() as f64;
            let mean = draws.iter().sum::<f64>() / n;
            let sigma = (draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / n).sqrt();
            let min = draws.iter().copied().fold(f64::MAX, f64::min);
            let max = draws.iter().copied().fold(0.0, f64::max);
            let what = published.operation;
            assert!(min >= published.min_s * 1000.0, "{what}: min {min}");
            assert_eq!(max, published.max_s * 1000.0, "{what}");
            let mean_error = (mean / (published.mean_s * 1000.0) - 1.0).abs();
            let sigma_error = (sigma / (published.sigma_s * 1000.0) - 1.0).abs();
            assert!(mean_error < 0.03, "{what}: mean {mean} ms");
            assert!(sigma_error < 0.15, "{what}: sigma {sigma} ms");
        }
    }
}
