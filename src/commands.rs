//! What each subcommand does (except `run`, which is the daemon). Each returns the text to
//! print, so tests can call them without a terminal.

use std::path::Path;

use anyhow::{Context, Result, bail};
use chrono::Utc;

use crate::cli::{LogArgs, LogFormat, PlanArgs, PlanFormat, PreviewArgs};
use crate::config::Config;
use crate::output::{self, when};
use crate::plan::{PlanSettings, customer_timezone};
use crate::playbook::Playbook;
use crate::query::{Upcoming, activity, upcoming};
use crate::render::{MessageExtras, message_context};
use crate::rules::{MessageDetail, Trigger, parse_duration};
use crate::store::{LogFilter, MessageState, SharedStore};
use crate::transport::Transport;

/// The log's columns live with the queries the web page shares; named here too, where the
/// `log` command's callers have always found them.
pub use crate::query::{LOG_HEADERS, log_row};

/// `touchpoint check`: the config, rules and templates, the transport's settings, and each
/// source's queries (run once with a zero-width window).
pub async fn check(config: &Config) -> Result<String> {
    let playbook = Playbook::load(config).map_err(|d| anyhow::anyhow!("{d}"))?;
    Transport::from_config(config)
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
    for line in source_lines {
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
    let settings = PlanSettings {
        default_timezone: config.defaults.timezone,
        default_expire_after: config.defaults.expire_after,
    };
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

/// `touchpoint preview`: one rule rendered for one customer.
pub async fn preview(config: &Config, store: &SharedStore, args: &PreviewArgs) -> Result<String> {
    let playbook = Playbook::load(config).map_err(|d| anyhow::anyhow!("{d}"))?;
    let Some(rule) = playbook.rule(&args.rule) else {
        let names: Vec<_> = playbook
            .rules
            .rules
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        bail!(
            "no rule named {:?}; the rules are: {}",
            args.rule,
            names.join(", ")
        );
    };
    let Some(customer) = store.customer(&args.customer).await? else {
        bail!("no customer with id {:?}", args.customer);
    };
    let kind = match &rule.trigger {
        Trigger::Event { kind, .. } | Trigger::Anniversary { kind, .. } => Some(kind),
        Trigger::Schedule { .. } => None,
    };
    let event = match (&args.event, kind) {
        (Some(id), _) => Some(store.event(id).await?.with_context(|| format!("no event with id {id:?}"))?),
        (None, Some(kind)) => Some(store.latest_event(&customer.id, kind).await?.with_context(|| {
            format!("customer {:?} has no {kind:?} event to preview the rule with (pass --event ID)", customer.id)
        })?),
        (None, None) => None,
    };
    let tz = customer_timezone(&customer, config.defaults.timezone);
    // What planning would fix for the next occurrence, from now.
    let detail = event
        .as_ref()
        .and_then(|e| rule.trigger.next_anniversary(e.occurred_at, tz, Utc::now()))
        .map_or_else(MessageDetail::default, |next| {
            MessageDetail::anniversary(next.years)
        });
    let extras = MessageExtras {
        years: detail.years,
        message_id: "<preview@touchpoint>".into(),
        unsubscribe_url: None,
        timezone: tz.name().into(),
    };
    let context = message_context(&customer, event.as_ref(), rule, &playbook.business, &extras);
    let rendered = playbook.templates.render(rule, &context)?;
    Ok(format!(
        "Subject: {}\nTo: {}\n\n--- text ---\n{}\n--- html ---\n{}\n",
        rendered.subject,
        customer.email,
        rendered.text.trim_end(),
        rendered.html.trim_end()
    ))
}

/// `touchpoint log`.
pub async fn log(store: &SharedStore, args: &LogArgs) -> Result<String> {
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
    let filter = LogFilter {
        since,
        rule: args.rule.clone(),
        state,
        customer_id: args.customer.clone(),
        limit: Some(args.limit.max(1)),
        ..LogFilter::default()
    };
    let entries = store.log(&filter).await?;
    let rows: Vec<Vec<String>> = entries.iter().map(|e| log_row(e).to_vec()).collect();
    Ok(match args.format {
        LogFormat::Json => serde_json::to_string_pretty(&entries)? + "\n",
        LogFormat::Csv => output::csv(&LOG_HEADERS, &rows)?,
        LogFormat::Table if rows.is_empty() => "no messages match\n".into(),
        LogFormat::Table => {
            // The table shows what fits a terminal; CSV and JSON carry every column.
            let picked = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
            let mut headers: Vec<&str> = picked.iter().map(|&i| LOG_HEADERS[i]).collect();
            headers.push("activity");
            let rows: Vec<Vec<String>> = rows
                .iter()
                .zip(&entries)
                .map(|(r, e)| {
                    picked
                        .iter()
                        .map(|&i| r[i].clone())
                        .chain([activity(e)])
                        .collect()
                })
                .collect();
            output::table(&headers, &rows, 40)
        }
    })
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
