//! `touchpoint why --customer ID [--rule NAME] [--format table|json]`: for each rule, whether it
//! messages the customer and, if not, the check that decided it (`plan::why`).

use anyhow::{Result, anyhow};
use chrono::Utc;
use serde_json::{Value, json};

use crate::cli::{WhyArgs, WhyFormat};
use crate::config::Config;
use crate::output::{self, when};
use crate::plan::PlanSettings;
use crate::plan::why::{WhySettings, why_customer};
use crate::playbook::Playbook;
use crate::rules::why::Why;
use crate::store::SharedStore;

/// Longest cell of the table: the answers are sentences.
const CELL: usize = 300;

pub async fn why(config: &Config, store: &SharedStore, args: &WhyArgs) -> Result<String> {
    let playbook = Playbook::load(config).map_err(|d| anyhow!("{d}"))?;
    let settings = WhySettings {
        plan: PlanSettings::from_config(config),
        max_attempts: config.delivery.max_attempts,
    };
    let answers = why_customer(
        store,
        &playbook,
        &settings,
        &args.customer,
        args.rule.as_deref(),
        Utc::now(),
    )
    .await?
    .ok_or_else(|| anyhow!("there is no customer {:?}", args.customer))?;
    let time = |t| when(Some(t));
    Ok(match args.format {
        WhyFormat::Json => {
            let rows: Vec<Value> = answers.iter().map(|w| json_row(w, &time)).collect();
            serde_json::to_string_pretty(&rows)? + "\n"
        }
        WhyFormat::Table => {
            let rows: Vec<Vec<String>> = answers
                .iter()
                .map(|w| {
                    let applies = if w.applies() { "yes" } else { "no" };
                    vec![w.rule.clone(), applies.into(), w.answer.words(&time)]
                })
                .collect();
            output::table(&["RULE", "APPLIES", "WHY"], &rows, CELL)
        }
    })
}

/// One rule's answer for programs: the reason's name and its facts, the words, and every check
/// with its verdict.
fn json_row(why: &Why, time: &dyn Fn(chrono::DateTime<Utc>) -> String) -> Value {
    let mut row = serde_json::to_value(&why.answer).unwrap_or_else(|_| json!({}));
    let checks: Vec<Value> = why
        .record
        .lines()
        .into_iter()
        .map(|(check, verdict)| json!({ "check": check, "verdict": verdict.name() }))
        .collect();
    if let Value::Object(fields) = &mut row {
        fields.insert("rule".into(), json!(why.rule));
        fields.insert("applies".into(), json!(why.applies()));
        fields.insert("says".into(), json!(why.answer.words(time)));
        fields.insert("checks".into(), json!(checks));
    }
    row
}
