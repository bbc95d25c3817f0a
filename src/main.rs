//! The `touchpoint` binary: parse the command line, set up logging, load the config, dispatch.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tokio_util::sync::CancellationToken;
use touchpoint::cli::{
    Cli, Command, CustomerCommand, EventCommand, ImportCommand, SuppressCommand,
};
use touchpoint::store::{Change, CustomerPatch};
use touchpoint::{commands, import};

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// journald with structured fields under systemd, readable text on a terminal otherwise.
/// `TOUCHPOINT_LOG` (or `RUST_LOG`) sets the filter, e.g. `touchpoint=debug`.
fn init_tracing() {
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("TOUCHPOINT_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let journald = if under_systemd {
        tracing_journald::layer().ok()
    } else {
        None
    };
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(layer) => registry.with(layer).init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    // No colour codes in files and pipes.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .init(),
    }
}

async fn dispatch(cli: Cli) -> Result<()> {
    if let Command::DefaultConfig = cli.command {
        print!("{}", include_str!("../config/touchpoint.toml"));
        return Ok(());
    }
    if let Command::HashPassword = cli.command {
        return hash_password();
    }
    let config_path = cli.config_path();
    let config = commands::load_config(&config_path)?;
    match &cli.command {
        Command::Run => {
            let shutdown = CancellationToken::new();
            let listeners = touchpoint::Listeners::bind(&config).await?;
            // Listening starts here, before the daemon can tell systemd it is ready.
            let signals = tokio::spawn(stop_on_signal(stop_signals()?, shutdown.clone()));
            let result = touchpoint::run(config, listeners, shutdown).await;
            signals.abort();
            result?;
        }
        Command::Check => println!("{}", commands::check(&config).await?),
        Command::Migrate => {
            commands::open_store(&config).await?;
            println!("migrations applied to {}", config.database_url().describe());
        }
        Command::Customer(CustomerCommand::Add(args)) => {
            let attributes =
                import::key_values(&args.attrs, "--attr").map_err(anyhow::Error::msg)?;
            let customer = import::customer(
                &args.id,
                &args.email,
                args.name.as_deref(),
                args.timezone.as_deref(),
                attributes,
            )
            .map_err(anyhow::Error::msg)?;
            let store = commands::open_store(&config).await?;
            // Updating keeps what the command does not mention: a name, a time zone, and
            // attributes not named by --attr. The database merges, so a change written by
            // someone else at the same moment is kept too.
            let patch = CustomerPatch {
                id: customer.id,
                email: customer.email,
                name: customer.name.map_or(Change::Keep, Change::Set),
                timezone: customer.timezone.map_or(Change::Keep, Change::Set),
                attributes: match customer.attributes {
                    serde_json::Value::Object(attributes) => attributes,
                    _ => serde_json::Map::new(),
                },
            };
            let created = store.merge_customers(std::slice::from_ref(&patch)).await?;
            let verb = if created == 0 { "updated" } else { "saved" };
            println!("customer {} {verb}", patch.id);
        }
        Command::Event(EventCommand::Add(args)) => {
            let store = commands::open_store(&config).await?;
            if store.customer(&args.customer).await?.is_none() {
                anyhow::bail!(
                    "no customer with id {:?}: add it first with `touchpoint customer add`",
                    args.customer
                );
            }
            let occurred_at = match &args.at {
                Some(text) => import::parse_time(text).map_err(|e| anyhow::anyhow!("--at: {e}"))?,
                None => chrono::Utc::now(),
            };
            let event = touchpoint::store::Event {
                id: args
                    .id
                    .clone()
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
                customer_id: args.customer.clone(),
                kind: args.kind.trim().to_string(),
                occurred_at,
                data: import::key_values(&args.data, "--data").map_err(anyhow::Error::msg)?,
            };
            if event.kind.is_empty() {
                anyhow::bail!("--kind is empty");
            }
            for (what, key) in [
                ("--customer", &event.customer_id),
                ("--kind", &event.kind),
                ("--id", &event.id),
            ] {
                import::check_key(what, key).map_err(anyhow::Error::msg)?;
            }
            let new = store.insert_events(std::slice::from_ref(&event)).await?;
            if new == 0 {
                println!("event {} exists already; nothing changed", event.id);
            } else {
                println!("event {} saved", event.id);
            }
        }
        Command::Import(ImportCommand::Customers { file }) => {
            let store = commands::open_store(&config).await?;
            let count = import::import_customers(&store, file).await?;
            println!("imported {count} customers from {}", file.display());
        }
        Command::Import(ImportCommand::Events { file }) => {
            let store = commands::open_store(&config).await?;
            let (read, new) = import::import_events(&store, file).await?;
            println!("imported {read} events from {} ({new} new)", file.display());
        }
        Command::Plan(args) => {
            let store = commands::open_store(&config).await?;
            print!("{}", commands::plan(&config, &store, args).await?);
        }
        Command::Preview(args) => {
            let store = commands::open_store(&config).await?;
            print!("{}", commands::preview(&config, &store, args).await?);
        }
        Command::Log(args) => {
            let store = commands::open_store(&config).await?;
            print!("{}", commands::log(&store, args).await?);
        }
        Command::Suppress(command) => {
            let store = commands::open_store(&config).await?;
            match command {
                SuppressCommand::Add { email, reason } => {
                    import::check_email(email).map_err(anyhow::Error::msg)?;
                    store.suppress(email, reason, "operator").await?;
                    println!("{email} will not be mailed again");
                }
                SuppressCommand::Remove { email } => {
                    if store.unsuppress(email).await? {
                        println!("{email} may be mailed again");
                    } else {
                        println!("{email} was not suppressed");
                    }
                }
                SuppressCommand::List { format } => {
                    print!("{}", commands::suppressions(&store, *format).await?)
                }
            }
        }
        Command::Bounce { recipient } => bounce(&config, recipient.clone()).await?,
        Command::DefaultConfig | Command::HashPassword => {}
    }
    Ok(())
}

/// What a pipe alias expects: exit 0 when the report was handled or is not one (nothing to
/// retry), 75 (EX_TEMPFAIL) when the database is unavailable, so the MTA tries again later.
async fn bounce(config: &touchpoint::config::Config, recipient: Option<String>) -> Result<()> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .context("cannot read the report from standard input")?;
    let recipients: Vec<String> = recipient
        .into_iter()
        .chain(
            ["ORIGINAL_RECIPIENT", "RECIPIENT"]
                .iter()
                .filter_map(|v| std::env::var(v).ok()),
        )
        .collect();
    let report = match touchpoint::bounce::parse_report(&raw, &recipients) {
        Ok(report) => report,
        Err(error) => {
            println!("ignored: {error}");
            return Ok(());
        }
    };
    let store = match commands::open_store(config).await {
        Ok(store) => store,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::exit(75);
        }
    };
    let rules = match touchpoint::daemon::link_secret(config, &store).await {
        Ok(secret) => touchpoint::daemon::bounce_rules(config, &secret),
        Err(touchpoint::daemon::DaemonError::Store(error)) => {
            eprintln!("error: {error}");
            std::process::exit(75);
        }
        Err(error) => return Err(error.into()),
    };
    let sender = touchpoint::bounce::Sender::Anyone;
    match touchpoint::bounce::apply(&store, &report, &rules, sender).await {
        Ok(applied) => println!(
            "recorded {} for message {} ({}){}{}",
            applied.kind.event(),
            applied
                .message
                .map_or_else(|| "-".into(), |m| m.to_string()),
            applied.email.unwrap_or_default(),
            if applied.repeated {
                "; a repeat of a report it had, counted once"
            } else {
                ""
            },
            if applied.suppressed {
                "; the address is suppressed"
            } else {
                ""
            }
        ),
        Err(touchpoint::bounce::BounceError::Store(error)) => {
            eprintln!("error: {error}");
            std::process::exit(75);
        }
        Err(error) => println!("ignored: {error}"),
    }
    Ok(())
}

/// `touchpoint hash-password`: the password from standard input (asked for twice, without echo,
/// on a terminal; the first line of piped input otherwise), its Argon2id hash on standard output.
fn hash_password() -> Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let read = |prompt: &str| -> Result<String> {
        if terminal {
            eprint!("{prompt}");
            std::io::stderr().flush().ok();
        }
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        if terminal {
            eprintln!();
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    };
    // No echo while typing on a terminal; `stty` is on every system with a terminal.
    let echo = |on: bool| {
        if terminal {
            let _ = std::process::Command::new("stty")
                .arg(if on { "echo" } else { "-echo" })
                .stdin(std::process::Stdio::inherit())
                .status();
        }
    };
    echo(false);
    let password = read("Password: ");
    let again = if terminal {
        read("Again: ")
    } else {
        Ok(String::new())
    };
    echo(true);
    let password = password?;
    if terminal && again? != password {
        anyhow::bail!("the two passwords differ; nothing printed");
    }
    if password.is_empty() {
        anyhow::bail!("the password is empty (pipe it in, or type it when asked)");
    }
    if password.chars().count() < 8 {
        eprintln!("warning: a password this short is easy to guess");
    }
    let hash = touchpoint::web::auth::hash_password(&password).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment this returns.
fn stop_signals() -> Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok((terminate, interrupt))
}

/// SIGTERM and SIGINT (Ctrl-C) stop the daemon cleanly.
async fn stop_on_signal(
    (mut terminate, mut interrupt): (tokio::signal::unix::Signal, tokio::signal::unix::Signal),
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
