//! What each subcommand does (except `run`, which is the daemon). Each returns the text to
//! print, so tests can call them without a terminal.

pub mod inbound;
mod init;
mod preview;
pub mod report;
mod summary;
pub mod why;

pub use init::init;
pub use preview::preview;

use std::path::Path;

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::cli::{
    CustomerAddArgs, DEFAULT_LOG_ROWS, EventAddArgs, ImportCommand, LogArgs, LogFormat, PlanArgs,
    PlanFormat, SuppressCommand,
};
use crate::config::Config;
use crate::output::{self, when};
use crate::plan::PlanSettings;
use crate::playbook::Playbook;
use crate::query::{LOG_HEADERS, Upcoming, activity, log_row, upcoming};
use crate::rules::parse_duration;
use crate::store::{Change, CustomerPatch, Event, LogCursor, LogFilter, MessageState, SharedStore};
use crate::transport::Transport;

/// `touchpoint check`: the config, rules and templates, the transport's settings, and each
/// source's queries (run once with a zero-width window); then a short summary for the operator
/// (see `summary`).
pub async fn check(config: &Config) -> Result<String> {
    summary::require_directories(config)?;
    let playbook = Playbook::load(config).map_err(|d| anyhow::anyhow!("{d}"))?;
    Transport::from_config(&config.transport)
        .map_err(anyhow::Error::msg)
        .context("the transport settings are wrong")?;
    let dkim = match &config.dkim {
        Some(dkim) => {
            crate::transport::dkim::load(dkim).map_err(|e| anyhow::anyhow!("dkim: {e}"))?;
            format!(
                "; DKIM key loads ({}._domainkey.{}, {:?})",
                dkim.selector, dkim.domain, dkim.algorithm
            )
        }
        None => String::new(),
    };
    config.link_secret().map_err(anyhow::Error::msg)?;
    config.bounce_webhook_secret().map_err(anyhow::Error::msg)?;
    config.api_tokens().map_err(anyhow::Error::msg)?;
    let imap_line = match &config.replies.imap {
        Some(imap) => Some(imap.settings().map_err(anyhow::Error::msg)?.describe()),
        None => None,
    };
    let source_lines =
        playbook.sources.check().await.map_err(|problems| {
            anyhow::anyhow!("sources have mistakes:\n{}", problems.join("\n"))
        })?;
    let enabled = playbook.rules.rules.iter().filter(|r| r.enabled).count();
    let mut report = format!(
        "{}: OK ({} rules, {} enabled; {} templates; database {}{dkim})",
        config.path.display(),
        playbook.rules.rules.len(),
        enabled,
        playbook.templates.names().len(),
        config.database_url().describe()
    );
    if let Some(digest) = &playbook.digest {
        let next = digest.next_slot(chrono::Utc::now()).map_or_else(
            || "never again".to_string(),
            |slot| {
                format!(
                    "next {}",
                    slot.at
                        .with_timezone(&digest.tz)
                        .format("%a %Y-%m-%d %H:%M")
                )
            },
        );
        report.push_str(&format!(
            "\ndigest: {:?} in {} to {} ({next})",
            digest.schedule.expression,
            digest.tz.name(),
            digest.to
        ));
    }
    for line in source_lines
        .into_iter()
        .chain(imap_line)
        .chain(summary::summary(config, &playbook).await)
    {
        report.push('\n');
        report.push_str(&line);
    }
    Ok(report)
}

/// Opens the configured database and applies migrations.
pub async fn open_store(config: &Config) -> Result<SharedStore> {
    let url = config.database_url();
    let store = crate::store::open(&url, config.database.max_connections)
        .await
        .with_context(|| format!("cannot open the database ({})", url.describe()))?;
    store
        .migrate()
        .await
        .context("cannot apply the database migrations")?;
    Ok(store)
}

/// `touchpoint plan`: every message that would go out in the next `days` days: those already
/// scheduled and those the rules would create now.
pub async fn plan(config: &Config, store: &SharedStore, args: &PlanArgs) -> Result<String> {
    let playbook = Playbook::load(config).map_err(|d| anyhow::anyhow!("{d}"))?;
    let settings = PlanSettings::from_config(config);
    let Upcoming { rows, unreadable } = upcoming(&playbook, &settings, store, args.days).await?;
    if !unreadable.is_empty() {
        bail!(
            "cannot read every source, so the plan would be incomplete:\n{}",
            unreadable.join("\n")
        );
    }
    Ok(match args.format {
        PlanFormat::Json => serde_json::to_string_pretty(&rows)? + "\n",
        PlanFormat::Table if rows.is_empty() => {
            format!("nothing to send in the next {} days\n", args.days)
        }
        PlanFormat::Table => {
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        when(Some(r.due_at)),
                        r.rule.clone(),
                        r.customer_id.clone(),
                        r.email.clone(),
                        r.status.clone(),
                        r.why.clone(),
                    ]
                })
                .collect();
            output::table(
                &["due (UTC)", "rule", "customer", "email", "status", "why"],
                &table,
                60,
            )
        }
    })
}

/// Messages read per query while `touchpoint log` exports.
const EXPORT_BATCH: i64 = 1000;

/// `touchpoint log`, written to `out` as it is read: exports (CSV, JSON) carry every matching
/// message (or `--limit` of them), in batches; the table shows the newest `--limit` (1000)
/// and says on `notes` (stderr) how many more match.
pub async fn log(
    store: &SharedStore,
    args: &LogArgs,
    out: &mut dyn std::io::Write,
    notes: &mut dyn std::io::Write,
) -> Result<()> {
    let filter = log_filter(args)?;
    match args.format {
        LogFormat::Table => log_table(store, args, filter, out, notes).await,
        LogFormat::Csv | LogFormat::Json => log_export(store, args, filter, out).await,
    }
}

/// The log's filter from `touchpoint log`'s flags; `--since` dates messages as the log does.
fn log_filter(args: &LogArgs) -> Result<LogFilter> {
    let since = match &args.since {
        Some(text) => {
            Some(Utc::now() - parse_duration(text).map_err(|e| anyhow::anyhow!("--since: {e}"))?)
        }
        None => None,
    };
    let state = match &args.status {
        Some(text) => Some(
            text.parse::<MessageState>()
                .map_err(|e| anyhow::anyhow!("--status: {e}"))?,
        ),
        None => None,
    };
    Ok(LogFilter {
        since,
        rule: args.rule.clone(),
        state,
        customer_id: args.customer.clone(),
        ..LogFilter::default()
    })
}

async fn log_table(
    store: &SharedStore,
    args: &LogArgs,
    mut filter: LogFilter,
    out: &mut dyn std::io::Write,
    notes: &mut dyn std::io::Write,
) -> Result<()> {
    let shown = args.limit.unwrap_or(DEFAULT_LOG_ROWS).max(1);
    filter.limit = Some(shown);
    let entries = store.log(&filter).await?;
    if entries.is_empty() {
        writeln!(out, "no messages match")?;
        return Ok(());
    }
    // The table shows what fits a terminal; CSV and JSON carry every column.
    let picked = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    let mut headers: Vec<&str> = picked.iter().map(|&i| LOG_HEADERS[i]).collect();
    headers.push("activity");
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let row = log_row(e);
            picked
                .iter()
                .map(|&i| row[i].clone())
                .chain([activity(e)])
                .collect()
        })
        .collect();
    write!(out, "{}", output::table(&headers, &rows, 40))?;
    if entries.len() as i64 == shown {
        let matching = store.log_count(&filter).await?;
        if matching > shown {
            writeln!(
                notes,
                "showing the newest {shown} of {matching} matching messages; \
                 --limit shows more, --format csv or json exports them all"
            )?;
        }
    }
    Ok(())
}

/// Every matching message (at most `--limit`) as CSV or a JSON array, batch by batch.
async fn log_export(
    store: &SharedStore,
    args: &LogArgs,
    mut filter: LogFilter,
    out: &mut dyn std::io::Write,
) -> Result<()> {
    let json = matches!(args.format, LogFormat::Json);
    let mut left = args.limit.map(|n| n.max(1));
    if json {
        write!(out, "[")?;
    } else {
        write_csv(out, &[LOG_HEADERS.map(str::to_string)])?;
    }
    let mut written = 0usize;
    loop {
        filter.limit = Some(left.map_or(EXPORT_BATCH, |n| n.min(EXPORT_BATCH)));
        let entries = store.log(&filter).await?;
        if json {
            for entry in &entries {
                let separator = if written == 0 { "\n" } else { ",\n" };
                write!(out, "{separator}{}", serde_json::to_string_pretty(entry)?)?;
                written += 1;
            }
        } else {
            write_csv(out, &entries.iter().map(log_row).collect::<Vec<_>>())?;
        }
        left = left.map(|n| n - entries.len() as i64);
        match entries.last() {
            Some(last) if Some(entries.len() as i64) == filter.limit => {
                filter.before = Some(LogCursor::after(last));
            }
            _ => break,
        }
        if left.is_some_and(|n| n <= 0) {
            break;
        }
    }
    if json {
        writeln!(out, "{}]", if written == 0 { "" } else { "\n" })?;
    }
    out.flush()?;
    Ok(())
}

/// CSV rows (through [`output::write_csv_row`]) written to `out`.
fn write_csv<const N: usize>(out: &mut dyn std::io::Write, rows: &[[String; N]]) -> Result<()> {
    let mut writer = csv::Writer::from_writer(out);
    for row in rows {
        output::write_csv_row(&mut writer, row)?;
    }
    writer.flush()?;
    Ok(())
}

/// `touchpoint suppress list`.
pub async fn suppressions(store: &SharedStore, format: LogFormat) -> Result<String> {
    let list = store.suppressions().await?;
    let headers = ["email", "reason", "source", "created_at"];
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.email.clone(),
                s.reason.clone(),
                s.source.clone(),
                when(Some(s.created_at)),
            ]
        })
        .collect();
    Ok(match format {
        LogFormat::Json => serde_json::to_string_pretty(&list)? + "\n",
        LogFormat::Csv => output::csv(&headers, &rows)?,
        LogFormat::Table if rows.is_empty() => "no suppressed addresses\n".into(),
        LogFormat::Table => output::table(&headers, &rows, 60),
    })
}

/// Reads the config for a command, with the path in every error.
pub fn load_config(path: &Path) -> Result<Config> {
    Config::load(path, std::env::vars()).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `touchpoint default-config`: the example config file, to start from.
pub fn default_config() -> &'static str {
    include_str!("../config/touchpoint.toml")
}

/// `touchpoint migrate`: opens the database, applies the migrations and says where.
pub async fn migrate(config: &Config) -> Result<String> {
    open_store(config).await?;
    Ok(format!(
        "migrations applied to {}",
        config.database_url().describe()
    ))
}

/// `touchpoint customer add`: saves a customer, or updates the one with this id.
pub async fn customer_add(config: &Config, args: &CustomerAddArgs) -> Result<String> {
    let attributes =
        crate::import::key_values(&args.attrs, "--attr").map_err(anyhow::Error::msg)?;
    let customer = crate::import::customer(
        &args.id,
        &args.email,
        args.name.as_deref(),
        args.timezone.as_deref(),
        attributes,
    )
    .map_err(anyhow::Error::msg)?;
    let store = open_store(config).await?;
    // Updating keeps what the command does not mention: a name, a time zone, and attributes
    // not named by --attr. The database merges, so a change written by someone else at the
    // same moment is kept too.
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
    Ok(format!("customer {} {verb}", patch.id))
}

/// `touchpoint event add`: records one event of an existing customer (once per id).
pub async fn event_add(config: &Config, args: &EventAddArgs) -> Result<String> {
    use crate::import;
    let store = open_store(config).await?;
    if store.customer(&args.customer).await?.is_none() {
        bail!(
            "no customer with id {:?}: add it first with `touchpoint customer add`",
            args.customer
        );
    }
    let occurred_at = match &args.at {
        Some(text) => import::parse_time(text).map_err(|e| anyhow::anyhow!("--at: {e}"))?,
        None => Utc::now(),
    };
    let event = Event {
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
        bail!("--kind is empty");
    }
    for (what, key) in [
        ("--customer", &event.customer_id),
        ("--kind", &event.kind),
        ("--id", &event.id),
    ] {
        import::check_key(what, key).map_err(anyhow::Error::msg)?;
    }
    let new = store.insert_events(std::slice::from_ref(&event)).await?;
    Ok(if new == 0 {
        format!("event {} exists already; nothing changed", event.id)
    } else {
        format!("event {} saved", event.id)
    })
}

/// `touchpoint import customers|events`: a CSV file, all rows or none.
pub async fn import(config: &Config, command: &ImportCommand) -> Result<String> {
    let store = open_store(config).await?;
    Ok(match command {
        ImportCommand::Customers { file } => {
            let count = crate::import::import_customers(&store, file).await?;
            format!("imported {count} customers from {}", file.display())
        }
        ImportCommand::Events { file } => {
            let (read, new) = crate::import::import_events(&store, file).await?;
            format!("imported {read} events from {} ({new} new)", file.display())
        }
    })
}

/// `touchpoint suppress add|remove|list`; the text to print, with its line ends.
pub async fn suppress(config: &Config, command: &SuppressCommand) -> Result<String> {
    let store = open_store(config).await?;
    Ok(match command {
        SuppressCommand::Add { email, reason } => {
            crate::import::check_email(email).map_err(anyhow::Error::msg)?;
            store.suppress(email, reason, "operator").await?;
            format!("{email} will not be mailed again\n")
        }
        SuppressCommand::Remove { email } => {
            if store.unsuppress(email).await? {
                format!("{email} may be mailed again\n")
            } else {
                format!("{email} was not suppressed\n")
            }
        }
        SuppressCommand::List { format } => suppressions(&store, *format).await?,
    })
}

/// What `touchpoint bounce` tells the MTA that piped the report in.
#[derive(Debug, PartialEq, Eq)]
pub enum BounceAnswer {
    /// Handled, or not a report (nothing to retry): print this, exit 0.
    Done(String),
    /// The database is unavailable: print this as an error and exit 75 (EX_TEMPFAIL), so the
    /// MTA tries again later.
    TryLater(String),
}

/// Where the MTA delivered a piped mail: `--recipient`, then Postfix's `$ORIGINAL_RECIPIENT`
/// and `$RECIPIENT`.
fn envelope_recipients(recipient: Option<String>) -> Vec<String> {
    recipient
        .into_iter()
        .chain(
            ["ORIGINAL_RECIPIENT", "RECIPIENT"]
                .iter()
                .filter_map(|v| std::env::var(v).ok()),
        )
        .collect()
}

/// `touchpoint bounce`: one bounce or complaint report from `raw` (standard input), recorded
/// against its message.
pub async fn bounce(
    config: &Config,
    raw: &[u8],
    recipient: Option<String>,
) -> Result<BounceAnswer> {
    use crate::bounce::{BounceError, Sender, apply, parse_report};
    let recipients = envelope_recipients(recipient);
    let report = match parse_report(raw, &recipients) {
        Ok(report) => report,
        Err(error) => return Ok(BounceAnswer::Done(format!("ignored: {error}"))),
    };
    let store = match open_store(config).await {
        Ok(store) => store,
        Err(error) => return Ok(BounceAnswer::TryLater(format!("{error:#}"))),
    };
    let rules = match crate::daemon::link_secret(config, &store).await {
        Ok(secret) => crate::daemon::bounce_rules(config, &secret),
        Err(crate::daemon::DaemonError::Store(error)) => {
            return Ok(BounceAnswer::TryLater(error.to_string()));
        }
        Err(error) => return Err(error.into()),
    };
    Ok(match apply(&store, &report, &rules, Sender::Anyone).await {
        Ok(applied) => BounceAnswer::Done(format!(
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
        )),
        Err(BounceError::Store(error)) => BounceAnswer::TryLater(error.to_string()),
        Err(error) => BounceAnswer::Done(format!("ignored: {error}")),
    })
}

/// `touchpoint hash-password`: the password from standard input (asked for twice, without echo,
/// on a terminal; the first line of piped input otherwise), its Argon2id hash to print.
pub fn hash_password() -> Result<String> {
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
        bail!("the two passwords differ; nothing printed");
    }
    if password.is_empty() {
        bail!("the password is empty (pipe it in, or type it when asked)");
    }
    if password.chars().count() < 8 {
        eprintln!("warning: a password this short is easy to guess");
    }
    crate::web::auth::hash_password(&password).map_err(anyhow::Error::msg)
}
