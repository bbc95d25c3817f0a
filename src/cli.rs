//! The command line: one binary, `touchpoint`, with a subcommand per job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "touchpoint",
    version,
    about = "Proactive customer outreach: rules, schedules, email, and a log of every message."
)]
pub struct Cli {
    /// The config file [default: config/touchpoint.toml]
    #[arg(long, global = true, env = "TOUCHPOINT_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn config_path(&self) -> PathBuf {
        self.config
            .clone()
            .unwrap_or_else(|| PathBuf::from("config/touchpoint.toml"))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon (applies migrations first). Ctrl-C or SIGTERM stops it cleanly; SIGHUP
    /// reloads config, rules and templates.
    Run,
    /// Validate the config, rules and templates (rendering each with sample data).
    Check,
    /// Create or update the database tables.
    Migrate,
    /// Add or update customers.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// Add lifecycle events.
    #[command(subcommand)]
    Event(EventCommand),
    /// Import customers or events from a CSV file (all rows or none).
    #[command(subcommand)]
    Import(ImportCommand),
    /// What will be sent in the next days, to whom, when, by which rule and why (a dry run).
    Plan(PlanArgs),
    /// Render one rule for one customer: subject, text and HTML; `--format eml` prints the
    /// whole message, `--send-to` sends a test of it to that address only.
    Preview(PreviewArgs),
    /// The message log.
    Log(LogArgs),
    /// Why each rule did, will, or will not message a customer: the check that decided it.
    Why(WhyArgs),
    /// How customers answered: CSAT and NPS per rule and by week, ratings and replies per
    /// message sent, the latest comments and replies.
    Report(ReportArgs),
    /// The addresses that are never mailed.
    #[command(subcommand)]
    Suppress(SuppressCommand),
    /// Read one bounce (RFC 3464 delivery status notification) or complaint (ARF) from
    /// standard input, as an MTA pipe alias hands it, and record it against its message.
    Bounce {
        /// The address the report was delivered to (for VERP) [default: $ORIGINAL_RECIPIENT or
        /// $RECIPIENT, as Postfix's local delivery sets them]
        #[arg(long)]
        recipient: Option<String>,
    },
    /// Read one email (a customer's reply) from standard input, as an MTA pipe alias hands
    /// it, tie it to its message and customer, and record a `replied` event (an automatic
    /// answer as `auto_replied`).
    Inbound {
        /// The address the mail was delivered to (for its reply tag) [default:
        /// $ORIGINAL_RECIPIENT or $RECIPIENT, as Postfix's local delivery sets them]
        #[arg(long)]
        recipient: Option<String>,
    },
    /// Print the example config file, to start from.
    DefaultConfig,
    /// Write a working setup into DIR (config, the example rules, templates, var/), to start
    /// from; never overwrites a file.
    Init {
        /// The directory to write into (created if missing).
        dir: PathBuf,
    },
    /// Read a password from standard input (never from the command line) and print its hash
    /// for `web.password_hash`.
    HashPassword,
}

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Add a customer, or update the one with this id.
    Add(CustomerAddArgs),
}

#[derive(Debug, Args)]
pub struct CustomerAddArgs {
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub email: String,
    #[arg(long)]
    pub name: Option<String>,
    /// IANA time zone, e.g. Europe/Berlin [default: defaults.timezone]
    #[arg(long)]
    pub timezone: Option<String>,
    /// An attribute, repeatable: --attr plan=gold --attr city=Lyon
    #[arg(long = "attr", value_name = "KEY=VALUE")]
    pub attrs: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum EventCommand {
    /// Record that something happened to a customer.
    Add(EventAddArgs),
}

#[derive(Debug, Args)]
pub struct EventAddArgs {
    /// The customer's id.
    #[arg(long)]
    pub customer: String,
    /// What happened: purchase, discovery_call, wedding...
    #[arg(long)]
    pub kind: String,
    /// When (RFC 3339, or a date like 2019-06-15) [default: now]
    #[arg(long, value_name = "TIME")]
    pub at: Option<String>,
    /// The event's id, to make adding it idempotent [default: a new UUID]
    #[arg(long)]
    pub id: Option<String>,
    /// Event data, repeatable: --data order=1042 --data total=99.50
    #[arg(long = "data", value_name = "KEY=VALUE")]
    pub data: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ImportCommand {
    /// Columns id, email, name, timezone; any other column becomes an attribute.
    Customers { file: PathBuf },
    /// Columns customer_id (or customer), kind, occurred_at (or at), id; any other column
    /// becomes event data.
    Events { file: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlanFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    /// How many days ahead to look.
    #[arg(long, default_value_t = 7)]
    pub days: u32,
    #[arg(long, value_enum, default_value_t = PlanFormat::Table)]
    pub format: PlanFormat,
}

#[derive(Debug, Args)]
pub struct PreviewArgs {
    #[arg(long)]
    pub rule: String,
    #[arg(long)]
    pub customer: String,
    /// The triggering event to use [default: the customer's latest event of the rule's kind]
    #[arg(long)]
    pub event: Option<String>,
    /// Send a test of the message to this address only, exactly as it would go out (headers,
    /// DKIM, links) with "[TEST] " before the subject. It is not the customer's message: it
    /// changes nothing of theirs, and its links only say that it was a test.
    #[arg(long, value_name = "ADDRESS")]
    pub send_to: Option<String>,
    /// text: subject, text and HTML; eml: the complete RFC 5322 message as it would go out.
    #[arg(long, value_enum, default_value_t = PreviewFormat::Text)]
    pub format: PreviewFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreviewFormat {
    Text,
    Eml,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Table,
    Csv,
    Json,
}

/// How many messages `touchpoint log`'s table shows without `--limit`.
pub const DEFAULT_LOG_ROWS: i64 = 1000;

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Only messages dated within this long, e.g. 24h or 7d: sent, failed or skipped at (due
    /// at, for those that wait), as the web page's log dates them.
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    #[arg(long)]
    pub rule: Option<String>,
    /// scheduled, sending, retrying, sent, failed, skipped or unknown.
    #[arg(long, value_name = "STATE")]
    pub status: Option<String>,
    /// A customer id.
    #[arg(long)]
    pub customer: Option<String>,
    /// At most this many messages, newest first. The table shows 1000 unless told (and says
    /// on stderr when more match); CSV and JSON carry every matching message unless told.
    #[arg(long)]
    pub limit: Option<i64>,
    #[arg(long, value_enum, default_value_t = LogFormat::Table)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WhyFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct WhyArgs {
    /// The customer's id.
    #[arg(long)]
    pub customer: String,
    /// Only this rule (by name).
    #[arg(long)]
    pub rule: Option<String>,
    #[arg(long, value_enum, default_value_t = WhyFormat::Table)]
    pub format: WhyFormat,
}

#[derive(Debug, Subcommand)]
pub enum SuppressCommand {
    /// Never mail this address again.
    Add {
        email: String,
        #[arg(long, default_value = "added by the operator")]
        reason: String,
    },
    /// Allow mailing this address again.
    Remove { email: String },
    /// List suppressed addresses.
    List {
        #[arg(long, value_enum, default_value_t = LogFormat::Table)]
        format: LogFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The period: ratings, replies and sends within this long, e.g. 7d.
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    pub since: String,
    /// Only this rule (by name).
    #[arg(long)]
    pub rule: Option<String>,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
}
