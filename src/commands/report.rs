//! `touchpoint report [--since 30d] [--rule NAME] [--format table|json|csv]`: how customers
//! answered (`experience`), per rule and in all, by week, and the latest comments and replies.

use anyhow::{Result, anyhow};
use chrono::Utc;

use crate::cli::{ReportArgs, ReportFormat};
use crate::experience::{Experience, Figures, experience};
use crate::output::{self, when};
use crate::rules::parse_duration;
use crate::store::SharedStore;

/// The columns of the per-rule table and of the CSV.
const HEADERS: [&str; 10] = [
    "rule",
    "sent",
    "rated",
    "rating_rate",
    "csat",
    "csat_answers",
    "nps",
    "nps_answers",
    "replied",
    "reply_rate",
];

/// The columns of `HEADERS` a week shows.
const WEEK_COLUMNS: [usize; 7] = [0, 2, 4, 5, 6, 7, 8];

/// Longest cell of a table: comments are sentences.
const CELL: usize = 80;

pub async fn report(store: &SharedStore, args: &ReportArgs) -> Result<String> {
    let period = parse_duration(&args.since).map_err(|e| anyhow!("--since: {e}"))?;
    let since = Utc::now() - period;
    let report = experience(store, since, args.rule.as_deref()).await?;
    Ok(match args.format {
        ReportFormat::Json => serde_json::to_string_pretty(&report)? + "\n",
        ReportFormat::Csv => output::csv(&HEADERS, &rule_rows(&report, "", "all"))?,
        ReportFormat::Table => table(&report),
    })
}

/// One row per rule and one for all of them; `none` fills a figure there is nothing to compute
/// from.
fn rule_rows(report: &Experience, none: &str, all: &str) -> Vec<Vec<String>> {
    let rows = report
        .rules
        .iter()
        .map(|r| figure_row(&r.rule, &r.figures, none));
    let total = (report.rule.is_none() && !report.rules.is_empty())
        .then(|| figure_row(all, &report.total, none));
    rows.chain(total).collect()
}

fn figure_row(name: &str, f: &Figures, none: &str) -> Vec<String> {
    let number = |value: Option<f64>| value.map_or_else(|| none.to_string(), |v| v.to_string());
    vec![
        name.to_string(),
        f.sent.to_string(),
        f.rated.to_string(),
        number(f.rating_rate),
        number(f.csat),
        f.csat_answers.to_string(),
        number(f.nps),
        f.nps_answers.to_string(),
        f.replied.to_string(),
        number(f.reply_rate),
    ]
}

fn table(report: &Experience) -> String {
    let mut out = format!("since {}\n", when(Some(report.since)));
    let rows = rule_rows(report, "-", "(all rules)");
    if rows.is_empty() {
        out.push_str("nothing was sent, rated or answered in this period\n");
        return out;
    }
    out.push_str(&output::table(&HEADERS, &rows, CELL));
    if !report.weeks.is_empty() {
        let weeks: Vec<Vec<String>> = report
            .weeks
            .iter()
            .map(|w| {
                let row = figure_row(&w.week.to_string(), &w.figures, "-");
                // A week's rates have no sends to divide by; show the answers.
                WEEK_COLUMNS.iter().map(|&i| row[i].clone()).collect()
            })
            .collect();
        out.push_str("\nby week\n");
        let headers = [
            "week",
            "rated",
            "csat",
            "csat_answers",
            "nps",
            "nps_answers",
            "replied",
        ];
        out.push_str(&output::table(&headers, &weeks, CELL));
    }
    if !report.latest.is_empty() {
        let voices: Vec<Vec<String>> = report
            .latest
            .iter()
            .map(|v| {
                let score = match (&v.score, &v.scale) {
                    (Some(score), Some(scale)) => format!("{score} ({scale})"),
                    _ => String::new(),
                };
                vec![
                    when(Some(v.at)),
                    v.kind.clone(),
                    v.customer_id.clone(),
                    v.rule.clone().unwrap_or_default(),
                    v.message_id.map(|id| id.to_string()).unwrap_or_default(),
                    score,
                    v.text.clone(),
                ]
            })
            .collect();
        out.push_str("\nlatest comments and replies\n");
        let headers = ["at", "kind", "customer", "rule", "message", "score", "text"];
        out.push_str(&output::table(&headers, &voices, CELL));
    }
    out
}
