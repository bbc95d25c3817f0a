//! Retry delays: exponential backoff with jitter, shared by the dispatcher (relay pauses and
//! transient failures), the planner and the sources. A bottom-layer module: it imports nothing
//! from touchpoint.

use std::time::Duration;

use rand::Rng;

/// `base * 2^(n-1)`, at most `max`, with +-25% jitter so retries of many messages spread out.
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let raw = base.saturating_mul(1u32 << exponent).min(max);
    let jitter = rand::rng().random_range(0.75..=1.25);
    raw.mul_f64(jitter).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let base = Duration::from_secs(60);
        let max = Duration::from_secs(3600);
        for _ in 0..100 {
            let first = backoff(1, base, max);
            assert!(
                first >= Duration::from_secs(45) && first <= Duration::from_secs(75),
                "{first:?}"
            );
            let third = backoff(3, base, max);
            assert!(
                third >= Duration::from_secs(180) && third <= Duration::from_secs(300),
                "{third:?}"
            );
            assert!(backoff(30, base, max) <= max);
        }
    }
}
