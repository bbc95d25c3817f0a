//! `/`: what happened in the last 7 and 30 days, per rule and per day, and what needs the owner.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use serde_json::{Value, json};

use super::{day_start, plural, query_string, today, unavailable};
use crate::store::{ActivityCount, LogFilter, MessageState, SharedStore, StoreError};
use crate::web::Shared;
use crate::web::{Owner, Web, encode_query};

/// The final states the overview counts, in the chart's stacking order.
const FINAL_STATES: [MessageState; 4] = [
    MessageState::Sent,
    MessageState::Failed,
    MessageState::Skipped,
    MessageState::Unknown,
];

#[derive(Default, Clone, Copy)]
struct Tally {
    sent: i64,
    failed: i64,
    skipped: i64,
    unknown: i64,
    opened: i64,
    clicked: i64,
    bounced: i64,
    unsubscribed: i64,
    /// Of `sent`, those of rules that track opens (clicks): what the rates are out of. Zero
    /// for a rule that does not: its opens (clicks) are shown as "—", not 0.
    sent_tracking_opens: i64,
    sent_tracking_clicks: i64,
    tracks_opens: bool,
    tracks_clicks: bool,
}

impl Tally {
    fn add_state(&mut self, state: MessageState, n: i64) {
        match state {
            MessageState::Sent => {
                self.sent += n;
                if self.tracks_opens {
                    self.sent_tracking_opens += n;
                }
                if self.tracks_clicks {
                    self.sent_tracking_clicks += n;
                }
            }
            MessageState::Failed => self.failed += n,
            MessageState::Skipped => self.skipped += n,
            MessageState::Unknown => self.unknown += n,
            _ => {}
        }
    }

    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.failed += other.failed;
        self.skipped += other.skipped;
        self.unknown += other.unknown;
        self.opened += other.opened;
        self.clicked += other.clicked;
        self.bounced += other.bounced;
        self.unsubscribed += other.unsubscribed;
        self.sent_tracking_opens += other.sent_tracking_opens;
        self.sent_tracking_clicks += other.sent_tracking_clicks;
        self.tracks_opens |= other.tracks_opens;
        self.tracks_clicks |= other.tracks_clicks;
    }

    fn json(&self, rule: Option<&str>, from: NaiveDate) -> Value {
        let link = |state: &str| {
            let mut query = vec![("state", state.to_string()), ("from", from.to_string())];
            if let Some(rule) = rule {
                query.push(("rule", rule.to_string()));
            }
            format!("/log?{}", query_string(&query))
        };
        // "—" where the rule does not track: nothing was counted, so 0 would be a lie.
        let tracked = |tracks: bool, n: i64| if tracks { n.to_string() } else { "—".into() };
        json!({
            "sent": self.sent, "failed": self.failed, "skipped": self.skipped,
            "unknown": self.unknown,
            "opened": tracked(self.tracks_opens, self.opened),
            "clicked": tracked(self.tracks_clicks, self.clicked),
            "bounced": self.bounced, "unsubscribed": self.unsubscribed,
            "sent_link": link("sent"), "failed_link": link("failed"),
            "skipped_link": link("skipped"), "unknown_link": link("unknown"),
            "open_rate": percent(self.opened, self.sent_tracking_opens),
            "click_rate": percent(self.clicked, self.sent_tracking_clicks),
            "bounce_rate": percent(self.bounced, self.sent),
            "unsubscribe_rate": percent(self.unsubscribed, self.sent),
        })
    }
}

fn percent(part: i64, whole: i64) -> String {
    if whole <= 0 || part <= 0 {
        return String::new();
    }
    format!("{:.0}%", 100.0 * part as f64 / whole as f64)
}

/// What the overview reads from the database.
struct Loaded {
    activity: Vec<ActivityCount>,
    /// The last 7 days on their own: counted from the day's start, not from an hour (a zone
    /// such as Asia/Kolkata starts its days on the half hour).
    activity7: Vec<ActivityCount>,
    engaged30: Vec<(String, String, i64)>,
    engaged7: Vec<(String, String, i64)>,
    unknown: i64,
    scheduled: i64,
    retrying: i64,
}

impl Loaded {
    async fn read(
        store: &SharedStore,
        since30: DateTime<Utc>,
        since7: DateTime<Utc>,
    ) -> Result<Loaded, StoreError> {
        Ok(Loaded {
            activity: store.activity(since30).await?,
            activity7: store.activity(since7).await?,
            engaged30: store.engagement(since30).await?,
            engaged7: store.engagement(since7).await?,
            // Cheap, by the state index (a GROUP BY over every message is not).
            unknown: store.count_state(MessageState::Unknown).await?,
            scheduled: store.count_state(MessageState::Scheduled).await?,
            retrying: store.count_state(MessageState::Retrying).await?,
        })
    }
}

/// The counts per day (local) and state for the chart, and per rule for the two tables.
#[derive(Default)]
struct Tallies {
    by_day: BTreeMap<NaiveDate, [i64; 4]>,
    rules30: BTreeMap<String, Tally>,
    rules7: BTreeMap<String, Tally>,
}

impl Tallies {
    /// Every running rule has a row, even with nothing sent.
    fn new(shared: &Shared, web: &Web, first_day: NaiveDate, loaded: &Loaded) -> Tallies {
        let mut tallies = Tallies::default();
        for rule in &shared.playbook.borrow().rules.rules {
            let tally = Tally {
                tracks_opens: rule.track_opens,
                tracks_clicks: rule.track_clicks,
                ..Tally::default()
            };
            tallies.rules30.insert(rule.name.clone(), tally);
            tallies.rules7.insert(rule.name.clone(), tally);
        }
        for row in &loaded.activity {
            let day = row.hour.with_timezone(&web.timezone).date_naive();
            if day < first_day {
                continue;
            }
            if let Some(i) = FINAL_STATES.iter().position(|s| *s == row.state) {
                tallies.by_day.entry(day).or_default()[i] += row.count;
            }
            tallies
                .rules30
                .entry(row.rule.clone())
                .or_default()
                .add_state(row.state, row.count);
        }
        for row in &loaded.activity7 {
            tallies
                .rules7
                .entry(row.rule.clone())
                .or_default()
                .add_state(row.state, row.count);
        }
        add_engagement(&mut tallies.rules30, &loaded.engaged30);
        add_engagement(&mut tallies.rules7, &loaded.engaged7);
        tallies
    }
}

fn add_engagement(rules: &mut BTreeMap<String, Tally>, engaged: &[(String, String, i64)]) {
    for (rule, kind, n) in engaged {
        let tally = rules.entry(rule.clone()).or_default();
        match kind.as_str() {
            "opened" => tally.opened += n,
            "clicked" => tally.clicked += n,
            "bounced" => tally.bounced += n,
            "unsubscribed" => tally.unsubscribed += n,
            _ => {}
        }
    }
}

/// One table of the overview: a row per rule and the total, each linking to the log.
fn table(rules: &BTreeMap<String, Tally>, from: NaiveDate) -> Value {
    let mut total = Tally::default();
    let rows: Vec<Value> = rules
        .iter()
        .map(|(rule, tally)| {
            total.add(tally);
            let mut row = tally.json(Some(rule), from);
            row["rule"] = json!(rule);
            row["rule_link"] = json!(format!("/log?rule={}", encode_query(rule)));
            row
        })
        .collect();
    json!({ "rows": rows, "total": total.json(None, from), "from": from.to_string() })
}

pub async fn overview(owner: Owner, State(shared): State<Shared>) -> Response {
    let web = owner.web.clone();
    let now = Utc::now();
    let today = today(&web, now);
    let first_day = today - TimeDelta::days(29);
    let week_day = today - TimeDelta::days(6);
    let since30 = day_start(&web, first_day);
    let since7 = day_start(&web, week_day);
    let loaded = match Loaded::read(&shared.store, since30, since7).await {
        Ok(loaded) => loaded,
        Err(error) => return owner.with_cookie(unavailable(&web, &error)),
    };
    let tallies = Tallies::new(&shared, &web, first_day, &loaded);
    let chart = chart(&web, first_day, today, &tallies.by_day);
    let failed7: i64 = tallies.rules7.values().map(|t| t.failed).sum();
    let attention = attention(&shared, &web, now, week_day, loaded.unknown, failed7).await;
    let data = json!({
        "page": owner.page("Overview", "overview"),
        "attention": attention,
        "week": table(&tallies.rules7, week_day),
        "month": table(&tallies.rules30, first_day),
        "chart": chart,
        "waiting": loaded.scheduled + loaded.retrying,
        "retrying": loaded.retrying,
        "timezone": web.timezone.name(),
    });
    owner.render("overview", &data)
}

/// One line of "needs your attention", with an optional link.
fn item(level: &str, text: String, link: Option<String>, link_text: Option<&str>) -> Value {
    json!({ "level": level, "text": text, "link": link, "link_text": link_text })
}

/// What needs the owner: unknown outcomes, recent failures, a relay that stopped taking mail,
/// a stuck dispatcher, a failed reload, database trouble.
async fn attention(
    shared: &Shared,
    web: &Web,
    now: DateTime<Utc>,
    week_day: NaiveDate,
    unknown: i64,
    failed: i64,
) -> Vec<Value> {
    let mut items = Vec::new();
    items.extend(relay_stopped(shared, web, now).await);
    if unknown > 0 {
        items.push(item(
            "bad",
            format!(
                "{unknown} message{} may or may not have been delivered (the relay took the body but its reply was lost). They are not sent again by themselves.",
                plural(unknown)
            ),
            Some("/log?state=unknown".into()),
            Some("Look at them"),
        ));
    }
    if failed > 0 {
        items.push(item(
            "bad",
            format!(
                "{failed} message{} failed in the last 7 days.",
                plural(failed)
            ),
            Some(format!("/log?state=failed&from={week_day}")),
            Some("See why"),
        ));
    }
    items.extend(daemon_trouble(shared, web));
    items
}

/// The relay refused mail in the last 24 hours and nothing was sent since.
async fn relay_stopped(shared: &Shared, web: &Web, now: DateTime<Utc>) -> Option<Value> {
    let (at, reason) = shared.health.last_relay_error()?;
    if now - at >= TimeDelta::hours(24) {
        return None;
    }
    let latest_sent = shared
        .store
        .log(&LogFilter {
            state: Some(MessageState::Sent),
            limit: Some(1),
            ..LogFilter::default()
        })
        .await
        .ok()
        .and_then(|entries| entries.first().and_then(|e| e.sent_at));
    if latest_sent.is_some_and(|sent| sent >= at) {
        return None;
    }
    Some(item(
        "bad",
        format!(
            "The mail relay has not accepted mail since {}: {reason}. Messages wait and are tried again; nothing is lost.",
            web.time(at)
        ),
        Some("/upcoming".into()),
        Some("What is waiting"),
    ))
}

/// A stuck dispatcher, a failed reload, database trouble.
fn daemon_trouble(shared: &Shared, web: &Web) -> Vec<Value> {
    let mut items = Vec::new();
    let health = &shared.health;
    let idle = health.dispatcher_idle_for();
    if idle > std::time::Duration::from_secs(30) {
        items.push(item(
            "bad",
            format!(
                "The dispatcher has not turned its loop for {}s: messages are not going out.",
                idle.as_secs()
            ),
            None,
            None,
        ));
    }
    if let Some(reload) = health.last_reload().filter(|r| !r.ok) {
        items.push(item(
            "warn",
            format!(
                "The last reload of the rules ({}) failed; the rules that were running still run: {}",
                web.time(reload.at),
                reload.message.lines().next().unwrap_or_default()
            ),
            None,
            None,
        ));
    }
    if let Some(error) = health.last_database_error() {
        items.push(item(
            "warn",
            format!("The database reported a problem: {error}"),
            None,
            None,
        ));
    }
    items
}

const WIDTH: f64 = 640.0;
const TOP: f64 = 14.0;
const PLOT: f64 = 150.0;
const LEFT: f64 = 48.0;

/// Messages per day by state as stacked bars, laid out here so the template only draws them.
fn chart(
    web: &Web,
    first: NaiveDate,
    last: NaiveDate,
    by_day: &BTreeMap<NaiveDate, [i64; 4]>,
) -> Value {
    let days: Vec<NaiveDate> = first.iter_days().take_while(|d| *d <= last).collect();
    let max = by_day
        .values()
        .map(|counts| counts.iter().sum::<i64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let top = round_top(max);
    let slot = (WIDTH - LEFT) / days.len().max(1) as f64;
    let bar = (slot * 0.72).max(1.0);
    let mut total = 0i64;
    let bars: Vec<Value> = days
        .iter()
        .enumerate()
        .map(|(i, day)| {
            let counts = by_day.get(day).copied().unwrap_or_default();
            total += counts.iter().sum::<i64>();
            let x = LEFT + i as f64 * slot + (slot - bar) / 2.0;
            day_bar(*day, counts, x, bar, top)
        })
        .collect();
    json!({
        "width": WIDTH, "height": TOP + PLOT + 30.0,
        "left": LEFT, "top": TOP, "bottom": TOP + PLOT, "label_y": TOP + PLOT + 22.0,
        "mid": round(TOP + PLOT / 2.0), "mid_label": if top % 2 == 0 { (top / 2).to_string() } else { String::new() },
        "max_label": top.to_string(),
        "bars": bars, "ticks": ticks(&days, slot),
        "summary": format!(
            "Messages per day over the last {} days by state ({} in all), days in {}",
            days.len(), total, web.timezone.name()
        ),
        "empty": total == 0,
    })
}

/// A round top for the scale, at least `max`: 1, 2, 5, 10, 20, 50...
fn round_top(max: i64) -> i64 {
    let mut top = 1i64;
    for step in [1, 2, 5].iter().cycle().scan(1i64, |scale, &s| {
        let value = s * *scale;
        if s == 5 {
            *scale *= 10;
        }
        Some(value)
    }) {
        top = step;
        if step >= max {
            break;
        }
    }
    top
}

/// One day's stacked bar at `x`, `width` wide, on a scale up to `top`.
fn day_bar(day: NaiveDate, counts: [i64; 4], x: f64, width: f64, top: i64) -> Value {
    let mut y = TOP + PLOT;
    let mut segments = Vec::new();
    let mut parts = Vec::new();
    for (state, n) in FINAL_STATES.iter().zip(counts) {
        if n == 0 {
            continue;
        }
        let h = PLOT * n as f64 / top as f64;
        y -= h;
        segments.push(json!({
            "class": state.as_str(),
            "x": round(x), "y": round(y), "w": round(width), "h": round(h.max(0.5)),
        }));
        parts.push(format!("{n} {state}"));
    }
    let label = day.format("%a %b %-d").to_string();
    let title = if parts.is_empty() {
        format!("{label}: nothing")
    } else {
        format!("{label}: {}", parts.join(", "))
    };
    json!({ "segments": segments, "title": title })
}

/// Every 7th day counting back from today, so today always has its label.
fn ticks(days: &[NaiveDate], slot: f64) -> Vec<Value> {
    let mut ticks = Vec::new();
    for (i, day) in days.iter().enumerate() {
        if (days.len() - 1 - i) % 7 == 0 {
            let last = i + 1 == days.len();
            ticks.push(json!({
                "x": if last { WIDTH } else { round(LEFT + i as f64 * slot + slot / 2.0) },
                "anchor": if last { "end" } else { "middle" },
                "label": day.format("%b %-d").to_string(),
            }));
        }
    }
    ticks
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
