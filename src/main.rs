//! The `touchpoint` binary: parse the command line, set up logging, load the config, dispatch
//! to the library. What each command does lives in `touchpoint::commands` (and
//! `touchpoint::daemon` for `run`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use touchpoint::cli::{Cli, Command, CustomerCommand, EventCommand};
use touchpoint::commands::{self, BounceAnswer};

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
        Ok(code) => code,
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

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", commands::default_config());
            return Ok(ExitCode::SUCCESS);
        }
        Command::HashPassword => {
            println!("{}", commands::hash_password()?);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Init { dir } => {
            print!("{}", commands::init(&dir)?);
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let config = commands::load_config(&cli.config_path())?;
    match &cli.command {
        Command::Run => touchpoint::daemon::run_until_signalled(config).await?,
        Command::Check => println!("{}", commands::check(&config).await?),
        Command::Migrate => println!("{}", commands::migrate(&config).await?),
        Command::Customer(CustomerCommand::Add(args)) => {
            println!("{}", commands::customer_add(&config, args).await?)
        }
        Command::Event(EventCommand::Add(args)) => {
            println!("{}", commands::event_add(&config, args).await?)
        }
        Command::Import(command) => println!("{}", commands::import(&config, command).await?),
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
            commands::log(
                &store,
                args,
                &mut std::io::stdout().lock(),
                &mut std::io::stderr(),
            )
            .await?;
        }
        Command::Why(args) => {
            let store = commands::open_store(&config).await?;
            print!("{}", commands::why::why(&config, &store, args).await?);
        }
        Command::Report(args) => {
            let store = commands::open_store(&config).await?;
            print!("{}", commands::report::report(&store, args).await?);
        }
        Command::Suppress(command) => print!("{}", commands::suppress(&config, command).await?),
        Command::Bounce { recipient } => return bounce(&config, recipient.clone()).await,
        Command::Inbound { recipient } => return inbound(&config, recipient.clone()).await,
        Command::DefaultConfig | Command::HashPassword | Command::Init { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// `touchpoint inbound`: a customer's reply, piped in like a bounce report.
async fn inbound(
    config: &touchpoint::config::Config,
    recipient: Option<String>,
) -> Result<ExitCode> {
    let raw = read_stdin("the mail")?;
    Ok(pipe_exit(
        commands::inbound::inbound(config, &raw, recipient).await?,
    ))
}

/// What a pipe alias expects: exit 0 when the report was handled or is not one (nothing to
/// retry), 75 (EX_TEMPFAIL) when the database is unavailable, so the MTA tries again later.
async fn bounce(
    config: &touchpoint::config::Config,
    recipient: Option<String>,
) -> Result<ExitCode> {
    let raw = read_stdin("the report")?;
    Ok(pipe_exit(commands::bounce(config, &raw, recipient).await?))
}

fn read_stdin(what: &str) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let mut raw = Vec::new();
    std::io::stdin()
        .read_to_end(&mut raw)
        .with_context(|| format!("cannot read {what} from standard input"))?;
    Ok(raw)
}

fn pipe_exit(answer: BounceAnswer) -> ExitCode {
    match answer {
        BounceAnswer::Done(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        BounceAnswer::TryLater(error) => {
            eprintln!("error: {error}");
            ExitCode::from(75)
        }
    }
}
