//! The benchmarks of `benches/touchpoint.rs` with a few thousand rows, in the debug build, so
//! they cannot rot: each runs end to end on both backends (real databases, the real daemon,
//! Postfix's smtp-sink and smtp-source) and produces sane numbers. Nothing here asserts speed;
//! the numbers are in BENCHMARKS.md (`bench/run`).

#[path = "../benches/support/mod.rs"]
mod bench;

use std::time::Duration;

use bench::Backend;

async fn planning(backend: Backend) {
    let r = bench::planning(backend, 3_000, 100)
        .await
        .expect("planning");
    eprintln!("{r:?}");
    // Every event rule's message (two thirds of the events) and the anniversaries within
    // `planner.horizon` (some of the other third).
    assert!(
        (2_000..=3_000).contains(&r.planned),
        "one message per event, anniversaries within the horizon: {r:?}"
    );
    assert_eq!(r.new_planned, 100, "{r:?}");
    assert!(r.first_pass > Duration::ZERO && r.idle_pass > Duration::ZERO);
}

async fn sending(backend: Backend) {
    let r = bench::sending(backend, 2_000, 4).await.expect("sending");
    eprintln!("{r:?}");
    assert_eq!(r.sent, 2_000, "{r:?}");
    assert!(r.rate.is_finite() && r.rate > 0.0, "{r:?}");
    assert!(r.ceiling.is_finite() && r.ceiling > 0.0, "{r:?}");
    assert!(r.message_bytes > 1_000, "a real message: {r:?}");
    assert!(r.peak_rss > 1_000_000, "{r:?}");
}

async fn punctuality(backend: Backend) {
    let r = bench::punctuality(backend, 500, Duration::from_secs(3), Duration::from_secs(5))
        .await
        .expect("punctuality");
    eprintln!("{r:?}");
    assert_eq!(r.sent, 500, "{r:?}");
    // Never sent before it was due; the rest is speed, not asserted here.
    assert!(r.min_ms >= -5.0, "{r:?}");
    assert!(r.p50_ms <= r.p99_ms && r.p99_ms <= r.max_ms, "{r:?}");
}

async fn idle(backend: Backend) {
    let r = bench::idle(backend, 2_000, Duration::from_secs(3))
        .await
        .expect("idle");
    eprintln!("{r:?}");
    assert!(r.rss > 1_000_000 && r.peak_rss >= r.rss, "{r:?}");
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario(super::Backend::Sqlite).await
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario(super::Backend::Postgres).await
                }
            }
        )*
    };
}

on_both_backends!(planning, sending, punctuality, idle);
