//! The benchmarks behind BENCHMARKS.md and the README's numbers. Run them with `bench/run`
//! (installs Postfix when missing, then everything on both backends), or one at a time:
//!
//! ```sh
//! cargo bench --bench touchpoint -- planning --backend sqlite --planning-sizes 10000,100000
//! cargo bench --bench touchpoint -- sending punctuality idle --small
//! ```
//!
//! What each measures is written in `benches/support/mod.rs`; `tests/bench_smoke.rs` runs the
//! same code with a few thousand rows in every `cargo test`.
#![forbid(unsafe_code)]

mod support;

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use support::{Backend, mb, ms};

#[derive(Parser, Debug)]
#[command(about = "touchpoint's benchmarks: planning, sending, punctuality, idle cost")]
struct Args {
    /// Which benchmarks: planning, sending, punctuality, idle (default: all four).
    items: Vec<String>,
    /// sqlite, postgres or both.
    #[arg(long, default_value = "both")]
    backend: String,
    /// Small sizes (a quick look; the numbers in BENCHMARKS.md use the defaults).
    #[arg(long)]
    small: bool,
    /// Customers (one event each) for planning [default: 10000,100000,1000000].
    #[arg(long, value_delimiter = ',')]
    planning_sizes: Option<Vec<u64>>,
    /// Due messages to send [default: 100000].
    #[arg(long)]
    messages: Option<u64>,
    /// SMTP connections (K) for sending; several values run several times [default: 4].
    #[arg(long, value_delimiter = ',')]
    connections: Option<Vec<usize>>,
    /// Messages for punctuality [default: 10000].
    #[arg(long)]
    punctual: Option<u64>,
    /// Seconds the punctuality messages' due times are spread over [default: 60].
    #[arg(long)]
    spread: Option<u64>,
    /// Future messages for the idle daemon [default: 1000000].
    #[arg(long)]
    idle_messages: Option<u64>,
    /// Seconds of idling measured [default: 60].
    #[arg(long)]
    idle_seconds: Option<u64>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let all = ["planning", "sending", "punctuality", "idle"];
    let items: Vec<String> = if args.items.is_empty() {
        all.iter().map(|s| s.to_string()).collect()
    } else {
        args.items.clone()
    };
    if let Some(bad) = items.iter().find(|i| !all.contains(&i.as_str())) {
        bail!("unknown benchmark {bad:?}: expected one of {all:?}");
    }
    let backends = match args.backend.as_str() {
        "sqlite" => vec![Backend::Sqlite],
        "postgres" | "postgresql" => vec![Backend::Postgres],
        "both" => vec![Backend::Sqlite, Backend::Postgres],
        other => bail!("--backend {other:?}: expected sqlite, postgres or both"),
    };
    let small = args.small;
    let planning_sizes = args.planning_sizes.clone().unwrap_or(if small {
        vec![2_000, 20_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    });
    let messages = args
        .messages
        .unwrap_or(if small { 10_000 } else { 100_000 });
    let connections = args.connections.clone().unwrap_or(vec![4]);
    let punctual = args.punctual.unwrap_or(if small { 2_000 } else { 10_000 });
    let spread = Duration::from_secs(args.spread.unwrap_or(if small { 15 } else { 60 }));
    let idle_messages = args
        .idle_messages
        .unwrap_or(if small { 20_000 } else { 1_000_000 });
    let idle_window = Duration::from_secs(args.idle_seconds.unwrap_or(if small { 15 } else { 60 }));

    println!("machine: {}", support::machine().await);
    println!(
        "command: cargo bench --bench touchpoint -- {}",
        std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect::<Vec<_>>()
            .join(" ")
    );

    if items.iter().any(|i| i == "planning") {
        let mut table = String::from(
            "\n### 1. Planning (one event per customer, the three example rules)\n\n\
             | backend | customers | first pass | planned | per 1k | pass, nothing new | full pass, nothing new | 1,000 new events |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for backend in &backends {
            for size in &planning_sizes {
                eprintln!("planning: {} customers on {}", size, backend.name());
                let new = (*size / 10).min(1_000);
                let r = support::planning(*backend, *size, new).await?;
                let row = format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} ({} planned) |\n",
                    backend.name(),
                    r.customers,
                    ms(r.first_pass),
                    r.planned,
                    ms(r.first_pass.mul_f64(1000.0 / r.customers.max(1) as f64)),
                    ms(r.idle_pass),
                    ms(r.full_pass_again),
                    ms(r.new_events_pass),
                    r.new_planned,
                );
                eprint!("{row}");
                table.push_str(&row);
            }
        }
        println!("{table}");
    }

    if items.iter().any(|i| i == "sending") {
        let mut table = format!(
            "\n### 2. Sending {messages} due messages to smtp-sink, and 5. peak memory\n\n\
             | backend | K | message | touchpoint | first / second half | smtp-source -d ceiling | ratio | start to last sent | peak RSS | daemon CPU | PostgreSQL CPU |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        );
        for backend in &backends {
            for k in &connections {
                eprintln!(
                    "sending: {messages} messages over {k} connections on {}",
                    backend.name()
                );
                let r = support::sending(*backend, messages, *k).await?;
                if r.sent != r.messages {
                    bail!("only {} of {} messages were sent", r.sent, r.messages);
                }
                let row = format!(
                    "| {} | {} | {} B | {:.0}/s | {:.0}/s / {:.0}/s | {:.0}/s | {:.2} | {:.1} s | {} | {:.1} s | {:.1} s |\n",
                    backend.name(),
                    r.connections,
                    r.message_bytes,
                    r.rate,
                    r.first_half_rate,
                    r.second_half_rate,
                    r.ceiling,
                    r.ratio(),
                    r.wall,
                    mb(r.peak_rss),
                    r.daemon_cpu.as_secs_f64(),
                    r.database_cpu.as_secs_f64(),
                );
                eprint!("{row}");
                table.push_str(&row);
            }
        }
        println!("{table}");
    }

    if items.iter().any(|i| i == "punctuality") {
        let mut table = format!(
            "\n### 3. Punctuality: {punctual} messages due over {}s (sent_at - due_at)\n\n\
             | backend | sent | p50 | p99 | max | min |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
            spread.as_secs()
        );
        for backend in &backends {
            eprintln!("punctuality: {punctual} messages on {}", backend.name());
            let r =
                support::punctuality(*backend, punctual, spread, Duration::from_secs(10)).await?;
            let row = format!(
                "| {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} ms |\n",
                backend.name(),
                r.sent,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.min_ms
            );
            eprint!("{row}");
            table.push_str(&row);
        }
        println!("{table}");
    }

    if items.iter().any(|i| i == "idle") {
        let mut table = format!(
            "\n### 4. Idle: {idle_messages} future messages, nothing due, {}s measured\n\n\
             | backend | startup (reconciliation) | its CPU (daemon + PostgreSQL) | daemon CPU in the window | per minute | PostgreSQL CPU in the window | RSS | peak RSS |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            idle_window.as_secs()
        );
        for backend in &backends {
            eprintln!(
                "idle: {idle_messages} future messages on {}",
                backend.name()
            );
            let r = support::idle(*backend, idle_messages, idle_window).await?;
            let per_minute = r.cpu.mul_f64(60.0 / r.window.as_secs_f64());
            let row = format!(
                "| {} | {:.1} s | {:.2} s | {} | {} | {} | {} | {} |\n",
                backend.name(),
                r.startup.as_secs_f64(),
                r.startup_cpu.as_secs_f64(),
                ms(r.cpu),
                ms(per_minute),
                ms(r.database_cpu),
                mb(r.rss),
                mb(r.peak_rss),
            );
            eprint!("{row}");
            table.push_str(&row);
        }
        println!("{table}");
    }
    Ok(())
}
