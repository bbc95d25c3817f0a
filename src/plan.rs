//! Planning: turning rules plus customers and events into `messages` rows.
//!
//! For each rule one set-based query selects the rows it may apply to and that have no message
//! yet (an anti-join on the unique `dedupe_key`), page by page in `seq` order. The times are
//! computed here, in Rust, because they need the customer's time zone (SQLite has no time zone
//! database, and one implementation of DST keeps both backends identical). Inserting is
//! idempotent, so a restart, a reload or a second replica never creates a second message.
//!
//! Two kinds of pass: an incremental one over rows whose `seq` is above the last pass's cursor
//! (cheap, runs every few seconds), and a full reconciliation (at start, after a reload, and every
//! `planner.reconcile_every`) that also plans the next occurrence of yearly and recurring rules
//! and picks up edits to existing rows.

pub mod why;

use std::sync::Arc;

use chrono::{DateTime, Datelike, TimeDelta, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::calendar;
use crate::playbook::Playbook;
#[cfg(test)]
use crate::rules::attributes_match;
use crate::rules::{MessageDetail, Rule, Trigger, conditions_match};
use crate::sources::{EventQuery, Source, SourceError, Sources};
use crate::store::{
    Candidate, CandidateQuery, CandidateSource, Customer, Event, MonthDays, NewMessage,
    SharedStore, StoreError, StoreResult,
};

/// Rows fetched per planning query.
const PAGE: i64 = 5_000;

/// Planned messages written in one transaction, at most (several pages). Each commit on SQLite
/// writes every index page it changed, and a page of due times spread over a year changes most
/// of the time-ordered indexes' pages: fewer, larger commits write each of them fewer times
/// (BENCHMARKS.md, planning). It also bounds how long one insert holds SQLite's write lock.
const INSERT_ROWS: usize = 20_000;

/// `seq` values one planning query looks at, at most. Bounding the range keeps each query's
/// work proportional to its page whatever plan the database picks: given the whole range of a
/// million events, PostgreSQL hash-joined and sorted all of it again for every page of 5,000,
/// which made the first pass quadratic (BENCHMARKS.md, planning).
const SPAN: i64 = 20_000;

/// What planning needs from the config.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub default_timezone: Tz,
    pub default_expire_after: TimeDelta,
    /// `planner.horizon`: anniversaries further ahead are not planned yet. `None` plans every
    /// next anniversary (what `touchpoint plan` lists: what the rules want, planned or not).
    pub horizon: Option<TimeDelta>,
}

impl PlanSettings {
    /// The settings the config gives: its defaults and `planner.horizon`.
    pub fn from_config(config: &crate::config::Config) -> PlanSettings {
        PlanSettings {
            default_timezone: config.defaults.timezone,
            default_expire_after: config.defaults.expire_after,
            horizon: Some(config.planner.horizon),
        }
    }
}

/// The effective time zone of a customer: theirs when it is a valid IANA name, else the default.
pub fn customer_timezone(customer: &Customer, default: Tz) -> Tz {
    customer
        .timezone
        .as_deref()
        .and_then(|name| name.parse::<Tz>().ok())
        .unwrap_or(default)
}

/// The message a rule wants for one candidate row, if any, as of `now`.
pub fn plan_candidate(
    rule: &Rule,
    candidate: &Candidate,
    now: DateTime<Utc>,
    settings: &PlanSettings,
) -> Option<NewMessage> {
    let event_data = candidate.event.as_ref().map(|e| &e.data);
    if !conditions_match(&rule.only_if, &candidate.customer.attributes, event_data) {
        return None;
    }
    let tz = customer_timezone(&candidate.customer, settings.default_timezone);
    let expire = rule.expire_after.unwrap_or(settings.default_expire_after);
    // A new rule does not reach back further than its expiry.
    let earliest = now - expire;
    let (trigger_at, dedupe_key, detail) = match &rule.trigger {
        Trigger::Event { after, .. } => {
            let event = candidate.event.as_ref()?;
            let trigger_at = event.occurred_at.checked_add_signed(*after)?;
            (
                trigger_at,
                format!("{}:{}", rule.name, event.id),
                MessageDetail::default(),
            )
        }
        Trigger::Anniversary { .. } => {
            let event = candidate.event.as_ref()?;
            let not_before = after_last(earliest, candidate.last_trigger);
            let next = rule
                .trigger
                .next_anniversary(event.occurred_at, tz, not_before)?;
            if settings
                .horizon
                .is_some_and(|horizon| next.at > now + horizon)
            {
                return None;
            }
            let key = format!("{}:{}:{}", rule.name, event.id, next.year);
            (next.at, key, MessageDetail::anniversary(next.years))
        }
        Trigger::Schedule { cron, .. } => {
            let after = after_last(earliest, candidate.last_trigger) - TimeDelta::milliseconds(1);
            let at = calendar::next_cron(cron, tz, after)?;
            // The local slot, not the instant: a customer who moves to another time zone (or a
            // changed defaults.timezone) must not get the same occurrence twice.
            let slot = at.with_timezone(&tz).format("%Y-%m-%dT%H:%M");
            let key = format!("{}:{}:{slot}", rule.name, candidate.customer.id);
            (at, key, MessageDetail::default())
        }
    };
    let (due_at, expires_at) = rule.planned_times(trigger_at, tz, expire)?;
    if expires_at < now {
        return None;
    }
    if let Err(reason) = within_storable_years(expires_at) {
        tracing::warn!(rule = %rule.name, customer = %candidate.customer.id, event = ?candidate.event.as_ref().map(|e| &e.id), "not planned: {reason}");
        return None;
    }
    Some(NewMessage {
        rule: rule.name.clone(),
        customer_id: candidate.customer.id.clone(),
        event_id: candidate.event.as_ref().map(|e| e.id.clone()),
        dedupe_key,
        trigger_at,
        due_at,
        expires_at: Some(expires_at),
        detail: detail.to_json(),
    })
}

/// The last year a planned time may fall in. SQLite keeps times as text that sorts like the
/// instants only while the year has four digits: `+10000-01-01` sorts before `2026-01-01`, and
/// a message due then would be claimed at once. Both backends keep to it alike.
pub const LAST_PLANNED_YEAR: i32 = 9999;

/// Refuses a planned time (the latest of a message's: its expiry) after [`LAST_PLANNED_YEAR`].
fn within_storable_years(latest: DateTime<Utc>) -> Result<(), String> {
    if latest.year() > LAST_PLANNED_YEAR {
        return Err(format!(
            "its time ({}) is after {LAST_PLANNED_YEAR}-12-31, the last time touchpoint can keep",
            latest.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    Ok(())
}

/// The first moment a recurring rule may fire again: after its last occurrence, and not
/// before `earliest`.
fn after_last(earliest: DateTime<Utc>, last: Option<DateTime<Utc>>) -> DateTime<Utc> {
    match last {
        Some(last) => (last + TimeDelta::milliseconds(1)).max(earliest),
        None => earliest,
    }
}

/// The query that finds what `rule` may apply to.
fn source_for(rule: &Rule, now: DateTime<Utc>, settings: &PlanSettings) -> CandidateSource {
    match &rule.trigger {
        Trigger::Event { kind, after } => {
            let expire = rule.expire_after.unwrap_or(settings.default_expire_after);
            // A send window can push the due time out by up to a week.
            let slack = if rule.send_window.is_some() {
                TimeDelta::days(8)
            } else {
                TimeDelta::zero()
            };
            let unless_since = rule.unless_since_trigger();
            CandidateSource::NewEvents {
                kind: kind.clone(),
                occurred_from: now - *after - expire - slack,
                unless_since,
            }
        }
        Trigger::Anniversary { kind, .. } => {
            let expire = rule.expire_after.unwrap_or(settings.default_expire_after);
            CandidateSource::RecurringEvents {
                kind: kind.clone(),
                month_days: settings
                    .horizon
                    .and_then(|horizon| anniversary_days(now, expire, horizon)),
            }
        }
        Trigger::Schedule { .. } => CandidateSource::RecurringCustomers,
    }
}

/// Days of slack on each side of the anniversary window: an event's UTC date and its local
/// date differ by a day at most, and so do the anniversary's local date and its instant's
/// UTC date; a day more covers Feb 29, kept on Feb 28 in other years.
const ANNIVERSARY_SLACK_DAYS: i64 = 3;

/// The month-days (`MM-DD`, UTC) of events whose next anniversary may fall between the
/// earliest one a pass still plans (`now - expire`) and `now + horizon`, widened by
/// [`ANNIVERSARY_SLACK_DAYS`]: the query leaves out the others without a lookup per event,
/// so a full pass does not re-read every event a year from its anniversary. A superset:
/// `plan_candidate` decides. `None` when the window takes in the whole year.
fn anniversary_days(
    now: DateTime<Utc>,
    expire: TimeDelta,
    horizon: TimeDelta,
) -> Option<MonthDays> {
    let slack = TimeDelta::days(ANNIVERSARY_SLACK_DAYS);
    let from = now.checked_sub_signed(expire)?.checked_sub_signed(slack)?;
    let to = now.checked_add_signed(horizon)?.checked_add_signed(slack)?;
    if to - from >= TimeDelta::days(365) {
        return None;
    }
    Some(MonthDays {
        from: from.format("%m-%d").to_string(),
        to: to.format("%m-%d").to_string(),
    })
}

/// Plans `rule` over rows with `after_seq < seq <= up_to_seq`, page by page. Each page's
/// messages and candidates go to `on_page`; with `insert` they are also written. Returns how
/// many messages were new.
#[allow(clippy::too_many_arguments)]
pub async fn plan_rule(
    store: &SharedStore,
    rule: &Rule,
    after_seq: i64,
    up_to_seq: i64,
    now: DateTime<Utc>,
    settings: &PlanSettings,
    insert: bool,
    mut on_page: impl FnMut(&[NewMessage], &[Candidate]),
) -> StoreResult<u64> {
    let mut cursor = after_seq;
    let mut writer = BatchWriter::new(store);
    let mut pending: Vec<NewMessage> = Vec::new();
    // Windows that find nothing grow (up to 64 spans): `seq` has gaps (every upsert of an
    // existing customer uses up a value on PostgreSQL), and stepping through a sparse range
    // one span at a time would cost a query per span.
    let mut span = SPAN;
    while cursor < up_to_seq {
        let window_end = up_to_seq.min(cursor.saturating_add(span));
        let query = CandidateQuery {
            rule: rule.name.clone(),
            source: source_for(rule, now, settings),
            after_seq: cursor,
            up_to_seq: window_end,
            now,
            limit: PAGE,
            include_suppressed: rule.to == crate::rules::Recipient::Owner,
        };
        let candidates = writer.alongside(store.candidates(&query)).await?;
        // A full page may have left rows of this window behind: go on after its last row.
        cursor = match candidates.last() {
            Some(last) if candidates.len() as i64 == PAGE => last.seq,
            _ => window_end,
        };
        if candidates.is_empty() {
            span = (span * 2).min(SPAN * 64);
            continue;
        }
        span = SPAN;
        let planned: Vec<NewMessage> = candidates
            .iter()
            .filter_map(|c| plan_candidate(rule, c, now, settings))
            .collect();
        on_page(&planned, &candidates);
        if insert {
            pending.extend(planned);
            // The next pages' candidates cannot include these rows' events or customers (they
            // start after this page's last `seq`), so reading them while this batch is being
            // written, or holding it back, plans nothing twice.
            if pending.len() >= INSERT_ROWS {
                writer.write(std::mem::take(&mut pending)).await?;
            }
        }
    }
    writer.write(pending).await?;
    writer.finish().await
}

/// A batch being written, polled alongside the planner's reads.
type Writing<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = StoreResult<u64>> + Send + 'a>>;

/// Writes the planner's batches one at a time while the next pages are read: reading and
/// inserting each take about half of a first pass, and they use different connections
/// (SQLite: a reader and the writer, which WAL lets run side by side; PostgreSQL: two pooled
/// connections), so the database works on both at once. The batch is polled by the planner's
/// own task (not spawned): its allocations stay on that thread, where a spawned task's landed
/// in other threads' malloc arenas and kept ~40 MB more resident after a first pass over 1M.
/// Dropping it (a cancelled pass) drops the batch in flight, whose transaction rolls back.
struct BatchWriter<'a> {
    store: &'a SharedStore,
    in_flight: Option<Writing<'a>>,
    inserted: u64,
}

impl<'a> BatchWriter<'a> {
    fn new(store: &'a SharedStore) -> BatchWriter<'a> {
        BatchWriter {
            store,
            in_flight: None,
            inserted: 0,
        }
    }

    /// Waits for the batch in flight, then starts writing `batch`.
    async fn write(&mut self, mut batch: Vec<NewMessage>) -> StoreResult<()> {
        self.wait().await?;
        if batch.is_empty() {
            return Ok(());
        }
        sort_for_indexes(&mut batch);
        let store = self.store;
        self.in_flight = Some(Box::pin(async move { store.insert_messages(&batch).await }));
        Ok(())
    }

    /// Runs `read` while the batch in flight goes on being written.
    async fn alongside<T>(
        &mut self,
        read: impl std::future::Future<Output = StoreResult<T>>,
    ) -> StoreResult<T> {
        let Some(mut writing) = self.in_flight.take() else {
            return read.await;
        };
        tokio::pin!(read);
        tokio::select! {
            result = &mut read => {
                self.in_flight = Some(writing);
                result
            }
            written = &mut writing => {
                self.inserted += written?;
                read.await
            }
        }
    }

    async fn wait(&mut self) -> StoreResult<()> {
        if let Some(writing) = self.in_flight.take() {
            self.inserted += writing.await?;
        }
        Ok(())
    }

    /// Waits for the last batch; how many messages were new.
    async fn finish(mut self) -> StoreResult<u64> {
        self.wait().await?;
        Ok(self.inserted)
    }
}

/// Orders a batch by due time. Two indexes that a planned row enters are ordered by (nearly)
/// the due time: `messages_waiting` (next_attempt_at) and `messages_expiring` (expires_at, the
/// due time plus the expiry); `messages_dated` was a third until migration 0012 kept waiting
/// messages out of it. A batch of anniversaries spreads over a year, so in `seq` order each row lands on a
/// random page of each of them; in due order the batch walks each index once, page after
/// page. The keys of the other indexes (rule and event or customer, id) fall on a
/// few neighbouring pages of each within one batch, in any order. Measured at the SQL level,
/// 400,000 rows like the event rules' in batches of 20,000: 7.5 s of CPU instead of 11 s on
/// SQLite, 7.4 s instead of 8.5 s on PostgreSQL. The key breaks ties so a batch is always
/// written in the same order (two replicas writing the same keys take them in one order).
fn sort_for_indexes(batch: &mut [NewMessage]) {
    batch.sort_unstable_by(|a, b| (a.due_at, &a.dedupe_key).cmp(&(b.due_at, &b.dedupe_key)));
}

/// What one planning pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PassReport {
    pub inserted: u64,
}

/// Plans every enabled rule over rows above the cursors; returns the new cursors.
pub async fn plan_pass(
    store: &SharedStore,
    playbook: &Playbook,
    cursors: Cursors,
    settings: &PlanSettings,
) -> StoreResult<(Cursors, PassReport)> {
    let (customers_hi, events_hi) = store.max_seqs().await?;
    let now = Utc::now();
    let mut report = PassReport::default();
    for rule in playbook.rules.rules.iter().filter(|r| r.enabled) {
        let (after, up_to) = match rule.trigger {
            Trigger::Schedule { .. } => (cursors.customers, customers_hi),
            _ => (cursors.events, events_hi),
        };
        if after >= up_to {
            continue;
        }
        report.inserted +=
            plan_rule(store, rule, after, up_to, now, settings, true, |_, _| {}).await?;
    }
    // The digest depends on the clock, not on new rows: every pass looks for its next time.
    if let Some(digest) = &playbook.digest {
        report.inserted += crate::digest::plan(store, digest, now).await?;
    }
    Ok((
        Cursors {
            customers: customers_hi,
            events: events_hi,
        },
        report,
    ))
}

/// The highest `seq` of customers and events already planned over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursors {
    pub customers: i64,
    pub events: i64,
}

/// The planner's loop: an incremental pass every `interval`, a full one every `reconcile_every`
/// and whenever the rules change. Wakes the dispatcher when it created messages.
pub struct Planner {
    pub store: SharedStore,
    pub playbook: watch::Receiver<Arc<Playbook>>,
    pub settings: PlanSettings,
    pub interval: std::time::Duration,
    pub reconcile_every: std::time::Duration,
    pub wake_dispatcher: Arc<Notify>,
    pub health: Arc<crate::metrics::Health>,
}

impl Planner {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut cursors = CursorHistory::default();
        let mut last_full = tokio::time::Instant::now();
        let mut failures = 0u32;
        // Where the next incremental pass over the sources starts; `None`: the whole window.
        let mut source_since = SourceCursors::new();
        loop {
            let playbook = self.playbook.borrow_and_update().clone();
            let full = cursors.is_empty() || last_full.elapsed() >= self.reconcile_every;
            let from = if full {
                Cursors::default()
            } else {
                cursors.rescan_from()
            };
            let delay = match plan_pass(&self.store, &playbook, from, &self.settings).await {
                Ok((next, report)) => {
                    if failures > 0 {
                        tracing::info!("planning works again");
                    }
                    failures = 0;
                    self.health.database_ok();
                    cursors.push(next);
                    if full {
                        last_full = tokio::time::Instant::now();
                    }
                    let from_sources = tokio::select! {
                        // A slow source must not hold up shutdown.
                        () = shutdown.cancelled() => return,
                        inserted = self.plan_sources(&playbook, full, &mut source_since) => inserted,
                    };
                    let inserted = report.inserted + from_sources;
                    if inserted > 0 {
                        tracing::info!(messages = inserted, full, "planned new messages");
                        self.wake_dispatcher.notify_one();
                    }
                    self.interval
                }
                Err(error) => {
                    failures += 1;
                    self.health.database_error(&error);
                    tracing::warn!(%error, failures, "planning failed; will retry");
                    crate::backoff::backoff(
                        failures,
                        self.interval,
                        std::time::Duration::from_secs(60),
                    )
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
                changed = self.playbook.changed() => {
                    if changed.is_err() { return; }
                    // New rules: plan everything again against them.
                    cursors = CursorHistory::default();
                    source_since.clear();
                }
            }
        }
    }
}

/// Per source query, where its next incremental pass starts: the start of its last good pass
/// less the source's `lookback`. A query that fails keeps its old start, so nothing it missed
/// is skipped; one without a start reads its whole window.
pub type SourceCursors = std::collections::HashMap<(String, String), DateTime<Utc>>;

impl Planner {
    /// One pass over the sources (the whole window when `full`). A source that fails is logged
    /// and shown in /healthz; it does not stop the other rules or sources.
    async fn plan_sources(
        &self,
        playbook: &Playbook,
        full: bool,
        cursors: &mut SourceCursors,
    ) -> u64 {
        if playbook.sources.is_empty() {
            return 0;
        }
        if full {
            cursors.clear();
        }
        let now = Utc::now();
        let report = plan_sources(
            &self.store,
            &playbook.sources,
            playbook,
            cursors,
            now,
            &self.settings,
            true,
        )
        .await;
        for failure in &report.failures {
            tracing::warn!(error = %failure, "cannot plan from a source; its rules wait, the others go on");
        }
        for (source, query) in report.read {
            let lookback = playbook
                .sources
                .source(&source)
                .map_or(TimeDelta::minutes(1), |s| s.lookback);
            cursors.insert((source, query), now - lookback);
        }
        report.inserted
    }
}

/// What a pass over the sources did.
#[derive(Debug, Default)]
pub struct SourcePassReport {
    pub inserted: u64,
    /// Events read from the sources.
    pub events_read: u64,
    /// What went wrong, one line per failed query (the other queries went on). A source that
    /// is being left alone after failing is not listed again.
    pub failures: Vec<String>,
    /// The (source, query) pairs read and planned in full.
    pub read: Vec<(String, String)>,
    /// The messages a dry run would have written.
    pub planned: Vec<SourcePlanned>,
}

/// A message planned from a source event, with whom and what it is about.
#[derive(Debug, Clone)]
pub struct SourcePlanned {
    pub message: NewMessage,
    pub customer: Customer,
    pub event: Event,
}

/// Plans every enabled event rule over the source events of its kind that occurred in the
/// rule's window (no earlier than the query's cursor, when it has one). Each query is run once
/// per pass, with the widest window its rules need.
///
/// With `insert` the messages are written; without, they are returned in the report (a dry
/// run: `touchpoint plan`).
pub async fn plan_sources(
    store: &SharedStore,
    sources: &Sources,
    playbook: &Playbook,
    cursors: &SourceCursors,
    now: DateTime<Utc>,
    settings: &PlanSettings,
    insert: bool,
) -> SourcePassReport {
    let mut report = SourcePassReport::default();
    let mut customers = CustomerCache::default();
    for source in &sources.sources {
        for query in &source.events {
            let key = (source.name.clone(), query.name.clone());
            let since = cursors.get(&key).copied();
            let rules: Vec<(&Rule, DateTime<Utc>)> = playbook
                .rules
                .rules
                .iter()
                .filter(|r| r.enabled)
                .filter_map(|rule| {
                    let from = source_window_start(rule, query, now, settings)?;
                    Some((rule, since.map_or(from, |s| s.max(from))))
                })
                .collect();
            let Some(from) = rules.iter().map(|(_, from)| *from).min() else {
                continue;
            };
            let planned = plan_source_query(
                store,
                source,
                query,
                &rules,
                from,
                now,
                settings,
                &mut customers,
            )
            .await;
            let written = match planned {
                Ok((read, planned)) => {
                    report.events_read += read;
                    if insert {
                        let messages: Vec<NewMessage> =
                            planned.into_iter().map(|p| p.message).collect();
                        store
                            .insert_messages(&messages)
                            .await
                            .map_err(SourcePlanError::from)
                    } else {
                        report.planned.extend(planned);
                        Ok(0)
                    }
                }
                Err(error) => Err(error),
            };
            match written {
                Ok(inserted) => {
                    report.inserted += inserted;
                    report.read.push(key);
                }
                Err(SourcePlanError::Source(SourceError::Paused { .. })) => {}
                Err(error) => report.failures.push(error.to_string()),
            }
        }
    }
    report
}

/// The earliest `occurred_at` that can still give `rule` a message, if `rule` reads `query`.
fn source_window_start(
    rule: &Rule,
    query: &EventQuery,
    now: DateTime<Utc>,
    settings: &PlanSettings,
) -> Option<DateTime<Utc>> {
    let Trigger::Event { kind, .. } = &rule.trigger else {
        return None;
    };
    if !query.kinds.contains(kind) {
        return None;
    }
    match source_for(rule, now, settings) {
        CandidateSource::NewEvents { occurred_from, .. } => Some(occurred_from),
        _ => None,
    }
}

/// Why a source query could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum SourcePlanError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("source events: {0}")]
    Store(#[from] StoreError),
}

/// Reads one query's window and plans its events for each rule; returns the events read and
/// the messages that do not exist yet.
#[allow(clippy::too_many_arguments)]
async fn plan_source_query(
    store: &SharedStore,
    source: &Source,
    query: &EventQuery,
    rules: &[(&Rule, DateTime<Utc>)],
    from: DateTime<Utc>,
    now: DateTime<Utc>,
    settings: &PlanSettings,
    customers: &mut CustomerCache,
) -> Result<(u64, Vec<SourcePlanned>), SourcePlanError> {
    let events = source.events_in(query, from, now).await?;
    // Each (rule, event) pair that may want a message and has none yet: a full pass re-reads
    // the whole window, and what was planned before costs one key lookup, not a customer read.
    let wanted: Vec<(&Rule, &Event, String)> = events
        .iter()
        .flat_map(|event| {
            rules.iter().filter_map(move |(rule, rule_from)| {
                let Trigger::Event { kind, .. } = &rule.trigger else {
                    return None;
                };
                (&event.kind == kind && event.occurred_at >= *rule_from).then(|| {
                    (
                        *rule,
                        event,
                        source_dedupe_key(&rule.name, &source.name, &event.id),
                    )
                })
            })
        })
        .collect();
    let keys: Vec<String> = wanted.iter().map(|(_, _, key)| key.clone()).collect();
    let existing = store.existing_dedupe_keys(&keys).await?;
    let mut planned = Vec::new();
    for (rule, event, key) in wanted {
        if existing.contains(&key) {
            continue;
        }
        let Some(customer) = customers.get(store, source, &event.customer_id).await? else {
            tracing::debug!(source = %source.name, event = %event.id, "no such customer; not planned");
            continue;
        };
        let candidate = Candidate {
            seq: 0,
            customer,
            event: Some(event.clone()),
            last_trigger: None,
        };
        if let Some(message) = plan_candidate(rule, &candidate, now, settings) {
            planned.push(SourcePlanned {
                message: from_source(message, source, query, event),
                customer: candidate.customer,
                event: event.clone(),
            });
        }
    }
    Ok((events.len() as u64, planned))
}

/// A message planned from a source event: its dedupe key names the source (ids of different
/// databases may collide), and its detail says where to read the event again at send time.
fn from_source(
    mut message: NewMessage,
    source: &Source,
    query: &EventQuery,
    event: &Event,
) -> NewMessage {
    message.dedupe_key = source_dedupe_key(&message.rule, &source.name, &event.id);
    message.detail =
        MessageDetail::from_source(&source.name, &query.name, event.occurred_at).to_json();
    message
}

/// `rule:source/event`: ids of different databases may collide.
fn source_dedupe_key(rule: &str, source: &str, event: &str) -> String {
    format!("{rule}:{source}/{event}")
}

/// Customers looked up during one pass, so each is read once.
#[derive(Default)]
struct CustomerCache {
    known: std::collections::HashMap<(String, String), Option<Customer>>,
}

impl CustomerCache {
    /// The customer from the source's customers query, or touchpoint's own table when the
    /// source has none.
    async fn get(
        &mut self,
        store: &SharedStore,
        source: &Source,
        id: &str,
    ) -> Result<Option<Customer>, SourcePlanError> {
        let key = (source.name.clone(), id.to_string());
        if let Some(known) = self.known.get(&key) {
            return Ok(known.clone());
        }
        let customer = if source.has_customers() {
            match source.customer(id).await {
                Ok(customer) => customer,
                // One unreadable customer (no email...) is skipped; the others go on.
                Err(error @ SourceError::Row { .. }) => {
                    tracing::warn!(%error, "customer cannot be read; their events are not planned");
                    None
                }
                Err(error) => return Err(error.into()),
            }
        } else {
            store.customer(id).await?
        };
        self.known.insert(key, customer.clone());
        Ok(customer)
    }
}

/// How far back incremental passes look again. On PostgreSQL a row can become visible after a
/// row with a higher `seq` (its transaction took the number first and committed later); such a
/// row is below the cursor when it appears. Rescanning what arrived in the last minute finds
/// it; rows already planned cost one index lookup each (the anti-join on `dedupe_key`).
const RESCAN: std::time::Duration = std::time::Duration::from_secs(60);

/// The cursors of recent passes, to rescan from the one at least `RESCAN` old.
#[derive(Debug, Default)]
struct CursorHistory {
    passes: std::collections::VecDeque<(tokio::time::Instant, Cursors)>,
}

impl CursorHistory {
    fn is_empty(&self) -> bool {
        self.passes.is_empty()
    }

    fn push(&mut self, cursors: Cursors) {
        let now = tokio::time::Instant::now();
        self.passes.push_back((now, cursors));
        // Keep the newest pass that is at least RESCAN old, and everything after it.
        while self.passes.len() >= 2 && now.duration_since(self.passes[1].0) >= RESCAN {
            self.passes.pop_front();
        }
    }

    fn rescan_from(&self) -> Cursors {
        self.passes.front().map(|(_, c)| *c).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{AttributeCondition, AttributeTest};
    use serde_json::json;

    #[test]
    fn attribute_conditions() {
        let attrs = json!({ "plan": "gold", "orders": 3, "vip": true, "gone": null, "n": "7" });
        let cond = |attribute: &str, test| {
            vec![AttributeCondition {
                attribute: attribute.into(),
                test,
                event_field: false,
            }]
        };
        assert!(attributes_match(
            &cond("plan", AttributeTest::Equals(json!("gold"))),
            &attrs
        ));
        assert!(!attributes_match(
            &cond("plan", AttributeTest::Equals(json!("silver"))),
            &attrs
        ));
        assert!(attributes_match(
            &cond("orders", AttributeTest::Equals(json!(3.0))),
            &attrs
        ));
        assert!(attributes_match(
            &cond("n", AttributeTest::Equals(json!(7))),
            &attrs
        ));
        assert!(attributes_match(
            &cond("vip", AttributeTest::In(vec![json!(false), json!(true)])),
            &attrs
        ));
        assert!(attributes_match(
            &cond("missing", AttributeTest::Exists(false)),
            &attrs
        ));
        assert!(attributes_match(
            &cond("gone", AttributeTest::Exists(false)),
            &attrs
        ));
        assert!(!attributes_match(
            &cond("plan", AttributeTest::Exists(false)),
            &attrs
        ));
        assert!(!attributes_match(
            &cond("missing", AttributeTest::Equals(json!("x"))),
            &attrs
        ));
        assert!(attributes_match(&[], &json!({})));
    }

    fn anniversary_rule(expire_after: &str) -> Rule {
        let source = format!(
            "[[rule]]\nname = \"wedding-anniversary\"\ntemplate = \"anniversary\"\n\
             subject = \"Happy anniversary\"\n\
             when = {{ anniversary_of = \"wedding\", at = \"09:00\" }}\n\
             expire_after = \"{expire_after}\"\n"
        );
        let (mut rules, errors) =
            crate::rules::parse_file(std::path::Path::new("t.toml"), &source, &|_| true);
        assert!(errors.is_empty(), "{errors:?}");
        rules.remove(0)
    }

    fn wedding(occurred_at: DateTime<Utc>, timezone: &str) -> Candidate {
        Candidate {
            seq: 1,
            customer: Customer {
                id: "c".into(),
                email: "c@example.com".into(),
                name: None,
                timezone: Some(timezone.into()),
                attributes: json!({}),
            },
            event: Some(Event {
                id: "e".into(),
                customer_id: "c".into(),
                kind: "wedding".into(),
                occurred_at,
                data: json!({}),
            }),
            last_trigger: None,
        }
    }

    fn settings(horizon: Option<TimeDelta>) -> PlanSettings {
        PlanSettings {
            default_timezone: Tz::UTC,
            default_expire_after: TimeDelta::days(1),
            horizon,
        }
    }

    fn utc(text: &str) -> DateTime<Utc> {
        text.parse().expect("a test time")
    }

    #[test]
    fn anniversaries_past_the_horizon_wait() {
        let rule = anniversary_rule("1d");
        let now = utc("2026-06-10T12:00:00Z");
        let soon = wedding(utc("2015-06-20T00:00:00Z"), "Europe/Berlin");
        let later = wedding(utc("2015-10-20T00:00:00Z"), "Europe/Berlin");
        let horizon = settings(Some(TimeDelta::days(35)));
        let planned = plan_candidate(&rule, &soon, now, &horizon).expect("within the horizon");
        assert_eq!(planned.trigger_at, utc("2026-06-20T07:00:00Z"));
        assert_eq!(planned.dedupe_key, "wedding-anniversary:e:2026");
        assert_eq!(plan_candidate(&rule, &later, now, &horizon), None);
        // Without a horizon (what `touchpoint plan` lists) the later one is there too, with the
        // key the planner gives it once it is within the horizon.
        let all = plan_candidate(&rule, &later, now, &settings(None)).expect("no horizon");
        assert_eq!(all.dedupe_key, "wedding-anniversary:e:2026");
        let then = utc("2026-09-20T12:00:00Z");
        assert_eq!(plan_candidate(&rule, &later, then, &horizon), Some(all));
    }

    #[test]
    fn the_anniversary_window_wraps_the_year_and_covers_it_whole_when_wide() {
        let days = |now, expire, horizon| {
            anniversary_days(utc(now), TimeDelta::days(expire), TimeDelta::days(horizon))
                .map(|d| (d.from, d.to))
        };
        assert_eq!(
            days("2026-06-10T12:00:00Z", 1, 35),
            Some(("06-06".into(), "07-18".into()))
        );
        assert_eq!(
            days("2026-12-20T12:00:00Z", 2, 35),
            Some(("12-15".into(), "01-27".into()))
        );
        assert_eq!(days("2026-06-10T12:00:00Z", 1, 361), None);
    }

    /// Whether the query's filter (the event's UTC month-day within the window) keeps `event`.
    fn kept(days: &MonthDays, event: DateTime<Utc>) -> bool {
        let day = event.format("%m-%d").to_string();
        if days.from <= days.to {
            days.from <= day && day <= days.to
        } else {
            days.from <= day || day <= days.to
        }
    }

    /// The query's filter is a superset of what `plan_candidate` plans within the horizon,
    /// whatever the time zone (UTC+14 to UTC-11), the day of the year (leap days included)
    /// and whether the event is a plain date or an instant late in the UTC day.
    #[test]
    fn the_anniversary_window_keeps_every_event_the_horizon_plans() {
        let rule = anniversary_rule("3d");
        let horizon = settings(Some(TimeDelta::days(35)));
        let mut planned = 0;
        for zone in [
            "Pacific/Kiritimati",
            "Pacific/Pago_Pago",
            "UTC",
            "America/St_Johns",
        ] {
            for step in 0..60 {
                let now = utc("2027-01-01T05:00:00Z") + TimeDelta::hours(step * 301);
                let days = anniversary_days(now, TimeDelta::days(3), TimeDelta::days(35))
                    .expect("a window shorter than a year");
                for day in 0..366 {
                    let date = utc("2024-01-01T00:00:00Z") + TimeDelta::days(day);
                    for occurred in [date, date + TimeDelta::minutes(23 * 60 + 30)] {
                        let candidate = wedding(occurred, zone);
                        if plan_candidate(&rule, &candidate, now, &horizon).is_some() {
                            planned += 1;
                            assert!(kept(&days, occurred), "{zone} {now} {occurred}");
                        }
                    }
                }
            }
        }
        assert!(planned > 1000, "{planned}");
    }

    #[test]
    fn invalid_customer_timezones_fall_back_to_the_default() {
        let mut customer = Customer {
            id: "c".into(),
            email: "c@example.com".into(),
            name: None,
            timezone: Some("Europe/Berlin".into()),
            attributes: json!({}),
        };
        assert_eq!(
            customer_timezone(&customer, Tz::UTC),
            chrono_tz::Europe::Berlin
        );
        customer.timezone = Some("Mars/Base".into());
        assert_eq!(customer_timezone(&customer, Tz::UTC), Tz::UTC);
    }
}
