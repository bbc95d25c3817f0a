//! Pure time arithmetic in a customer's time zone: send windows, anniversaries and cron
//! schedules, with daylight-saving gaps and overlaps and Feb 29 handled in one place.
//! Nothing here reads a clock: every function takes the moment it reasons about.
//!
//! One rule runs through the whole module, so that a send window, an anniversary and a cron
//! job agree on what a wall-clock time means: a local time that does not exist (a DST gap)
//! moves forward by the gap's length, and a local time that exists twice (a DST overlap) means
//! the earlier instant. See [`resolve_local`].

use chrono::{
    DateTime, Datelike, Days, NaiveDate, NaiveDateTime, NaiveTime, Offset, TimeDelta, TimeZone,
    Utc, Weekday,
};
use chrono_tz::Tz;

/// When a customer may be mailed, in their own time zone. `from > to` is an overnight window
/// (e.g. 20:00 to 08:00). `days` limits the window to some weekdays (the day the window opens).
/// `skip_dates` are local dates on which it does not open at all (quiet dates).
///
/// `from == to` is a 24-hour window (open all day on each opening day). An empty `days` list
/// is treated like `None`: a window that never opens would leave a message waiting forever, so
/// configuration should reject it before it gets here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendWindow {
    pub from: NaiveTime,
    pub to: NaiveTime,
    pub days: Option<Vec<Weekday>>,
    pub skip_dates: Vec<QuietDate>,
}

/// A local date on which nothing goes out: every year (`"12-25"`) or once (`"2026-12-31"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QuietDate {
    Yearly { month: u32, day: u32 },
    Once(NaiveDate),
}

impl QuietDate {
    /// Reads `"MM-DD"` (every year) or `"YYYY-MM-DD"` (that date only); the error says what was
    /// expected. `"02-29"` is kept in leap years only.
    pub fn parse(text: &str) -> Result<QuietDate, String> {
        let expected = "expected \"MM-DD\" (every year, like \"12-25\") or \"YYYY-MM-DD\" (once, like \"2026-12-31\")";
        let parts: Vec<&str> = text.split('-').collect();
        let number = |s: &str, len: usize| {
            (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
        };
        match parts.as_slice() {
            [m, d] => match (number(m, 2), number(d, 2)) {
                // 2024 is a leap year: any day that exists in some year exists in it.
                (Some(month), Some(day)) if NaiveDate::from_ymd_opt(2024, month, day).is_some() => {
                    Ok(QuietDate::Yearly { month, day })
                }
                (Some(_), Some(_)) => Err(format!("no such date \"{text}\": {expected}")),
                _ => Err(format!("bad date \"{text}\": {expected}")),
            },
            [y, m, d]
                if number(y, 4).is_some() && number(m, 2).is_some() && number(d, 2).is_some() =>
            {
                NaiveDate::parse_from_str(text, "%Y-%m-%d")
                    .map(QuietDate::Once)
                    .map_err(|_| format!("no such date \"{text}\": {expected}"))
            }
            _ => Err(format!("bad date \"{text}\": {expected}")),
        }
    }

    /// Whether local `day` is this quiet date.
    pub fn matches(&self, day: NaiveDate) -> bool {
        match *self {
            QuietDate::Yearly { month, day: d } => day.month() == month && day.day() == d,
            QuietDate::Once(date) => day == date,
        }
    }
}

impl std::fmt::Display for QuietDate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QuietDate::Yearly { month, day } => write!(f, "{month:02}-{day:02}"),
            QuietDate::Once(date) => write!(f, "{}", date.format("%Y-%m-%d")),
        }
    }
}

/// A local wall-clock time in `tz` as an instant. In a DST gap (02:30 on a spring-forward night)
/// the time moves forward by the gap's length (03:30); in an overlap (fall back) the earlier
/// instant is used. Never panics.
///
/// Moving by the gap's length (rather than to the gap's end) keeps distinct local times
/// distinct, so 02:15 and 02:45 stay half an hour apart. Outside chrono's range, where no
/// offset can be applied, the local time is read as UTC.
pub fn resolve_local(local: NaiveDateTime, tz: Tz) -> DateTime<Utc> {
    match tz.from_local_datetime(&local) {
        chrono::LocalResult::Single(dt) => dt.with_timezone(&Utc),
        chrono::LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
        chrono::LocalResult::None => resolve_in_gap(local, tz).unwrap_or_else(|| local.and_utc()),
    }
}

/// A local time inside a gap, read with the offset in force just before the gap.
///
/// The gap sits at a transition T with offsets `pre < post`, and `local - post < T <= local -
/// pre`. Reading `local` as UTC and correcting it by the offset found there twice lands once on
/// each side of T, so the two probes return `pre` and `post`, and the smaller one is `pre`.
fn resolve_in_gap(local: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    let naive = local.and_utc();
    let o0 = offset_at(naive, tz);
    let o1 = offset_at(naive.checked_sub_signed(o0)?, tz);
    let o2 = offset_at(naive.checked_sub_signed(o1)?, tz);
    naive.checked_sub_signed(o1.min(o2))
}

/// The UTC offset of `tz` at instant `t`.
fn offset_at(t: DateTime<Utc>, tz: Tz) -> TimeDelta {
    TimeDelta::seconds(i64::from(
        tz.offset_from_utc_datetime(&t.naive_utc())
            .fix()
            .local_minus_utc(),
    ))
}

/// The wall-clock time of `t` in `tz`.
///
/// Not `with_timezone(..).naive_local()`: that panics within a day of chrono's range. There the
/// UTC wall clock stands in, which is as close as the range allows.
fn local_of(t: DateTime<Utc>, tz: Tz) -> NaiveDateTime {
    let utc = t.naive_utc();
    utc.checked_add_signed(offset_at(t, tz)).unwrap_or(utc)
}

/// `day` moved by `n` days, or `None` outside chrono's range.
fn shift_days(day: NaiveDate, n: i64) -> Option<NaiveDate> {
    let magnitude = Days::new(n.unsigned_abs());
    if n >= 0 {
        day.checked_add_days(magnitude)
    } else {
        day.checked_sub_days(magnitude)
    }
}

impl SendWindow {
    /// A window open all day, every day: the carrier of quiet dates for a rule without one.
    pub fn all_day() -> SendWindow {
        SendWindow {
            from: NaiveTime::MIN,
            to: NaiveTime::MIN,
            days: None,
            skip_dates: Vec::new(),
        }
    }

    /// The quiet date local `day` is, if it is one.
    pub fn quiet_date(&self, day: NaiveDate) -> Option<QuietDate> {
        self.skip_dates.iter().copied().find(|q| q.matches(day))
    }

    /// The quiet date it is at `t` in `tz`, if it is one.
    pub fn quiet_at(&self, t: DateTime<Utc>, tz: Tz) -> Option<QuietDate> {
        self.quiet_date(local_of(t, tz).date())
    }

    /// Whether the window opens on local `day`.
    fn opens_on(&self, day: NaiveDate) -> bool {
        if self.quiet_date(day).is_some() {
            return false;
        }
        match &self.days {
            Some(days) if !days.is_empty() => days.contains(&day.weekday()),
            _ => true,
        }
    }

    /// The window that opens on local `day`, as the instants `[open, close)`.
    ///
    /// Working in instants (not in wall-clock times) is what makes a window that opens inside
    /// a gap open after it, and a window across the fall-back hour last an hour longer.
    fn interval(&self, day: NaiveDate, tz: Tz) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.opens_on(day) {
            return None;
        }
        let open_local = day.and_time(self.from);
        let close_day = if self.from < self.to {
            day
        } else {
            day.succ_opt()?
        };
        let close_local = close_day.and_time(self.to);
        let open = resolve_local(open_local, tz);
        let close = resolve_local(close_local, tz);
        if close > open {
            Some((open, close))
        } else {
            // The whole window lies in a gap (02:00-03:00 on a spring-forward night). Move it
            // forward as a whole rather than lose the day, so every opening day has a window.
            Some((open, open.checked_add_signed(close_local - open_local)?))
        }
    }

    /// The windows opening on the local days `first..=last` around the local date of `t`.
    fn intervals_near(
        &self,
        t: DateTime<Utc>,
        tz: Tz,
        first: i64,
        last: i64,
    ) -> impl Iterator<Item = (DateTime<Utc>, DateTime<Utc>)> + '_ {
        let today = local_of(t, tz).date();
        (first..=last)
            .filter_map(move |n| shift_days(today, n))
            .filter_map(move |day| self.interval(day, tz))
    }

    /// Whether `t` lies inside the window in `tz` (from inclusive, to exclusive).
    pub fn contains(&self, t: DateTime<Utc>, tz: Tz) -> bool {
        // A window containing `t` opened at most a day (overnight) before t's local date, or,
        // if its opening was pushed over midnight by a gap, on the day after.
        // On a quiet date nothing goes out, even in the morning part of an overnight window
        // that opened the evening before.
        self.quiet_at(t, tz).is_none()
            && self
                .intervals_near(t, tz, -2, 1)
                .any(|(open, close)| open <= t && t < close)
    }

    /// The earliest instant >= t inside the window (t itself if inside). Handles DST days (a
    /// window opening at 02:30 on a spring-forward day opens at 03:30), overnight windows,
    /// `days` and quiet dates. Always returns within 8 days plus one per quiet date.
    ///
    /// Only at the very edge of chrono's range, where no later window can be expressed, is `t`
    /// returned unchanged.
    pub fn next_open(&self, t: DateTime<Utc>, tz: Tz) -> DateTime<Utc> {
        if self.contains(t, tz) {
            return t;
        }
        // Every weekday recurs within 7 days, so one of the next 8 local days opens a window;
        // each quiet date can close at most one more of them.
        let reach = 8 + i64::try_from(self.skip_dates.len()).unwrap_or(i64::MAX / 2);
        self.intervals_near(t, tz, -1, reach)
            .map(|(open, _)| open)
            .filter(|open| *open > t)
            .min()
            .unwrap_or(t)
    }
}

/// The calendar date an anniversary is kept on: the date of `occurred_at` in `tz`, except that a
/// value at exactly 00:00:00.000 UTC is taken as a plain date (what a DATE column or
/// `--at 2019-06-15` stores) and its UTC date is used.
///
/// Without this rule a wedding stored as 2019-06-15 would be celebrated on June 14 by every
/// customer west of Greenwich.
pub fn anniversary_date(occurred_at: DateTime<Utc>, tz: Tz) -> NaiveDate {
    plain_date(occurred_at).unwrap_or_else(|| local_of(occurred_at, tz).date())
}

/// The date an event time stands for when it is a plain date (exactly 00:00:00.000 UTC, see
/// [`anniversary_date`]): it is shown as that date in every view, never as the evening before.
pub fn plain_date(occurred_at: DateTime<Utc>) -> Option<NaiveDate> {
    (occurred_at.time() == NaiveTime::MIN).then(|| occurred_at.date_naive())
}

/// One yearly recurrence of a date: when it is kept, in which year, and how many years on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anniversary {
    pub at: DateTime<Utc>,
    pub year: i32,
    pub years: i32,
}

/// The first anniversary (years >= 1) of `date` at local time `at` in `tz` whose instant is
/// >= not_before. Feb 29 falls on Feb 28 in non-leap years. None only if out of chrono's range.
///
/// Feb 28 (not Mar 1) keeps the anniversary in the month it belongs to.
pub fn next_anniversary(
    date: NaiveDate,
    at: NaiveTime,
    tz: Tz,
    not_before: DateTime<Utc>,
) -> Option<Anniversary> {
    // Start a year before not_before's local year: the anniversary in that year is certainly
    // too early or right, and the one two years on is certainly late enough.
    let local_year = local_of(not_before, tz).year();
    let first = local_year
        .checked_sub(date.year())?
        .saturating_sub(1)
        .max(1);
    for years in first..=first.saturating_add(3) {
        let year = date.year().checked_add(years)?;
        let day = NaiveDate::from_ymd_opt(year, date.month(), date.day())
            .or_else(|| NaiveDate::from_ymd_opt(year, date.month(), date.day().checked_sub(1)?))?;
        let instant = resolve_local(day.and_time(at), tz);
        if instant >= not_before {
            return Some(Anniversary {
                at: instant,
                year,
                years,
            });
        }
    }
    None
}

/// The first occurrence of `cron`, read as local time in `tz`, strictly after `after`. Local
/// times that fall in a DST gap move forward by the gap as in resolve_local (so a daily 02:30
/// job still runs once on the spring-forward day); in an overlap the job runs once (the earlier
/// instant). None if it never occurs again (or only after 5000-01-01, the end of croner's range).
///
/// croner's own zoned search is not used: it moves a fixed time in a gap to the gap's end
/// (03:00, not 03:30), skips gap times of interval jobs, and runs interval jobs twice in an
/// overlap. Instead the pattern is stepped over naive local times and each match is resolved
/// with [`resolve_local`], so every local time the pattern names maps to exactly one instant.
pub fn next_cron(cron: &croner::Cron, tz: Tz, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Local times in a gap resolve to instants after the gap, so a match that lies before
    // `after` on the wall clock can still lie after it in time. Start the walk before any gap
    // that ended less than a gap's length (at most a day) ago.
    let mut start = local_of(after, tz);
    let mut later = offset_at(after, tz);
    for hours in 1..=26 {
        let Some(probe) = after.checked_sub_signed(TimeDelta::hours(hours)) else {
            break;
        };
        let offset = offset_at(probe, tz);
        if offset < later {
            start = start.min(local_of(probe, tz));
        }
        later = offset;
    }

    // croner searches from year 1 to the start of 5000 and clamps an earlier start to year 1,
    // which would skip occurrences: outside its range there is no answer rather than a wrong one.
    if !(croner::YEAR_LOWER_LIMIT..croner::YEAR_UPPER_LIMIT).contains(&start.year()) {
        return None;
    }

    // Real (non-gap) local times resolve in increasing order, so the first real match after
    // `after` ends the search; gap matches met before it may still be earlier instants.
    let mut best: Option<DateTime<Utc>> = None;
    let mut local = cron.find_next_occurrence(&start, true).ok()?;
    loop {
        let instant = resolve_local(local, tz);
        if instant > after {
            best = Some(best.map_or(instant, |b| b.min(instant)));
            let in_gap = matches!(tz.from_local_datetime(&local), chrono::LocalResult::None);
            if !in_gap {
                return best;
            }
        }
        match cron.find_next_occurrence(&local, false) {
            Ok(next) => local = next,
            Err(_) => return best,
        }
    }
}

/// A time zone by IANA name ("Europe/Berlin"), with an error that says what is expected and
/// suggests a close name when there is one (case-insensitive match, e.g. "europe/berlin" ->
/// "did you mean Europe/Berlin?").
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    if let Ok(tz) = name.parse::<Tz>() {
        return Ok(tz);
    }
    let expected = "expected an IANA time zone name such as \"Europe/Berlin\", \
                    \"America/New_York\" or \"UTC\"";
    if name.trim().is_empty() {
        return Err(format!("the time zone is empty: {expected}"));
    }
    match suggest_timezone(name) {
        Some(close) => Err(format!(
            "unknown time zone \"{name}\": {expected}; did you mean {close}?"
        )),
        None => Err(format!("unknown time zone \"{name}\": {expected}")),
    }
}

/// A known zone name close to `name`: the same name ignoring case, surrounding space and
/// spaces for underscores ("america/new york"), or else a unique city ("berlin").
fn suggest_timezone(name: &str) -> Option<&'static str> {
    let wanted = name.trim().replace(' ', "_");
    let names = || chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name());
    if let Some(exact) = names().find(|n| n.eq_ignore_ascii_case(&wanted)) {
        return Some(exact);
    }
    let mut cities = names().filter(|n| {
        n.rsplit('/')
            .next()
            .is_some_and(|city| city.eq_ignore_ascii_case(&wanted))
    });
    let first = cities.next()?;
    // Several zones share a city name only through legacy aliases; suggest only when unique.
    cities.next().is_none().then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use chrono_tz::{America, Asia, Australia, Europe};
    use proptest::prelude::*;
    use std::str::FromStr;

    const NY: Tz = America::New_York;
    const BERLIN: Tz = Europe::Berlin;
    const LORD_HOWE: Tz = Australia::Lord_Howe;
    const KOLKATA: Tz = Asia::Kolkata;
    const UTC: Tz = Tz::UTC;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    fn naive(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, 0)
            .unwrap()
    }

    fn date(y: i32, mo: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, mo, d).unwrap()
    }

    fn hm(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn cron(pattern: &str) -> croner::Cron {
        croner::Cron::from_str(pattern).unwrap()
    }

    fn window(from: NaiveTime, to: NaiveTime, days: Option<Vec<Weekday>>) -> SendWindow {
        SendWindow {
            from,
            to,
            days,
            skip_dates: Vec::new(),
        }
    }

    // ---- resolve_local ----

    #[test]
    fn resolve_ordinary_times() {
        assert_eq!(
            resolve_local(naive(2026, 6, 15, 9, 0), NY),
            utc(2026, 6, 15, 13, 0)
        );
        assert_eq!(
            resolve_local(naive(2026, 1, 15, 9, 0), NY),
            utc(2026, 1, 15, 14, 0)
        );
        assert_eq!(
            resolve_local(naive(2026, 6, 15, 9, 0), BERLIN),
            utc(2026, 6, 15, 7, 0)
        );
        assert_eq!(
            resolve_local(naive(2026, 6, 15, 9, 0), KOLKATA),
            utc(2026, 6, 15, 3, 30)
        );
        assert_eq!(
            resolve_local(naive(2026, 6, 15, 9, 0), UTC),
            utc(2026, 6, 15, 9, 0)
        );
        // Lord Howe: +11 in (southern) summer, +10:30 in winter.
        assert_eq!(
            resolve_local(naive(2026, 1, 15, 9, 0), LORD_HOWE),
            utc(2026, 1, 14, 22, 0)
        );
        assert_eq!(
            resolve_local(naive(2026, 6, 15, 9, 0), LORD_HOWE),
            utc(2026, 6, 14, 22, 30)
        );
    }

    #[test]
    fn resolve_gap_moves_forward_by_the_gap() {
        // New York 2026-03-08: 02:00 EST -> 03:00 EDT. 02:30 becomes 03:30 EDT.
        assert_eq!(
            resolve_local(naive(2026, 3, 8, 2, 30), NY),
            utc(2026, 3, 8, 7, 30)
        );
        assert_eq!(
            resolve_local(naive(2026, 3, 8, 2, 0), NY),
            utc(2026, 3, 8, 7, 0)
        );
        assert_eq!(
            resolve_local(naive(2026, 3, 8, 2, 59), NY),
            utc(2026, 3, 8, 7, 59)
        );
        // Just outside the gap nothing moves.
        assert_eq!(
            resolve_local(naive(2026, 3, 8, 1, 59), NY),
            utc(2026, 3, 8, 6, 59)
        );
        assert_eq!(
            resolve_local(naive(2026, 3, 8, 3, 0), NY),
            utc(2026, 3, 8, 7, 0)
        );
        // Berlin 2026-03-29: 02:00 CET -> 03:00 CEST. 02:30 becomes 03:30 CEST = 01:30Z.
        assert_eq!(
            resolve_local(naive(2026, 3, 29, 2, 30), BERLIN),
            utc(2026, 3, 29, 1, 30)
        );
        // Lord Howe 2026-10-04: 02:00 +10:30 -> 02:30 +11. 02:15 becomes 02:45 +11.
        assert_eq!(
            resolve_local(naive(2026, 10, 4, 2, 15), LORD_HOWE),
            utc(2026, 10, 3, 15, 45)
        );
        assert_eq!(
            resolve_local(naive(2026, 10, 4, 2, 15), LORD_HOWE)
                .with_timezone(&LORD_HOWE)
                .time(),
            hm(2, 45)
        );
    }

    #[test]
    fn resolve_overlap_takes_the_earlier_instant() {
        // New York 2026-11-01: 01:30 happens at EDT (05:30Z) and at EST (06:30Z).
        assert_eq!(
            resolve_local(naive(2026, 11, 1, 1, 30), NY),
            utc(2026, 11, 1, 5, 30)
        );
        // Berlin 2026-10-25: 02:30 happens at CEST (00:30Z) and at CET (01:30Z).
        assert_eq!(
            resolve_local(naive(2026, 10, 25, 2, 30), BERLIN),
            utc(2026, 10, 25, 0, 30)
        );
        // Lord Howe 2026-04-05: 02:00 +11 -> 01:30 +10:30; 01:45 first happens at +11.
        assert_eq!(
            resolve_local(naive(2026, 4, 5, 1, 45), LORD_HOWE),
            utc(2026, 4, 4, 14, 45)
        );
    }

    #[test]
    fn resolve_never_panics_at_the_edges() {
        for tz in [
            NY,
            LORD_HOWE,
            KOLKATA,
            UTC,
            Tz::Etc__GMTPlus12,
            Tz::Etc__GMTMinus14,
        ] {
            let _ = resolve_local(NaiveDateTime::MAX, tz);
            let _ = resolve_local(NaiveDateTime::MIN, tz);
        }
    }

    /// Within a day of chrono's range a zone's local time cannot be represented; chrono's
    /// `naive_local` panics there, this module must not.
    #[test]
    fn nothing_panics_at_the_ends_of_time() {
        let all_day = window(hm(0, 0), hm(0, 0), None);
        let evening = window(hm(22, 0), hm(6, 0), Some(vec![Weekday::Sat]));
        for tz in chrono_tz::TZ_VARIANTS {
            for t in [DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC] {
                for w in [&all_day, &evening] {
                    let _ = w.contains(t, tz);
                    let _ = w.next_open(t, tz);
                }
                let _ = anniversary_date(t, tz);
                let _ = next_anniversary(date(2020, 2, 29), hm(9, 0), tz, t);
                let _ = next_cron(&cron("30 2 * * *"), tz, t);
            }
        }
    }

    // ---- send windows ----

    #[test]
    fn window_inside_before_after() {
        let w = window(hm(9, 0), hm(18, 0), None);
        // 12:00 New York (EDT) is inside.
        let noon = utc(2026, 6, 10, 16, 0);
        assert!(w.contains(noon, NY));
        assert_eq!(w.next_open(noon, NY), noon);
        // 07:00 local: opens at 09:00 the same day.
        assert!(!w.contains(utc(2026, 6, 10, 11, 0), NY));
        assert_eq!(
            w.next_open(utc(2026, 6, 10, 11, 0), NY),
            utc(2026, 6, 10, 13, 0)
        );
        // 18:00 local is outside (to is exclusive); 09:00 is inside (from inclusive).
        assert!(!w.contains(utc(2026, 6, 10, 22, 0), NY));
        assert!(w.contains(utc(2026, 6, 10, 13, 0), NY));
        // 20:00 local: next day 09:00.
        assert_eq!(
            w.next_open(utc(2026, 6, 11, 0, 0), NY),
            utc(2026, 6, 11, 13, 0)
        );
        // The same wall-clock window is a different instant in Kolkata and in UTC.
        assert_eq!(
            w.next_open(utc(2026, 6, 10, 0, 0), KOLKATA),
            utc(2026, 6, 10, 3, 30)
        );
        assert_eq!(
            w.next_open(utc(2026, 6, 10, 0, 0), UTC),
            utc(2026, 6, 10, 9, 0)
        );
    }

    #[test]
    fn window_overnight() {
        let w = window(hm(22, 0), hm(6, 0), None);
        // Berlin summer (+2): 23:00 and 05:59 local inside, 06:00 and 12:00 outside.
        assert!(w.contains(utc(2026, 6, 10, 21, 0), BERLIN));
        assert!(w.contains(utc(2026, 6, 11, 3, 59), BERLIN));
        assert!(!w.contains(utc(2026, 6, 11, 4, 0), BERLIN));
        assert!(!w.contains(utc(2026, 6, 11, 10, 0), BERLIN));
        assert_eq!(
            w.next_open(utc(2026, 6, 11, 10, 0), BERLIN),
            utc(2026, 6, 11, 20, 0)
        );
        // Overnight in a zone without DST.
        assert!(w.contains(utc(2026, 6, 10, 20, 0), KOLKATA)); // 01:30 local
        assert_eq!(
            w.next_open(utc(2026, 6, 10, 6, 30), KOLKATA),
            utc(2026, 6, 10, 16, 30)
        );
    }

    #[test]
    fn window_days_skip_the_weekend() {
        let weekdays = vec![
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
        ];
        let w = window(hm(9, 0), hm(17, 0), Some(weekdays.clone()));
        // 2026-06-12 is a Friday. 18:00 Friday -> Monday 09:00 EDT.
        assert_eq!(
            w.next_open(utc(2026, 6, 12, 22, 0), NY),
            utc(2026, 6, 15, 13, 0)
        );
        // Saturday noon is outside even though the time of day is inside.
        assert!(!w.contains(utc(2026, 6, 13, 16, 0), NY));
        assert_eq!(
            w.next_open(utc(2026, 6, 13, 16, 0), NY),
            utc(2026, 6, 15, 13, 0)
        );

        // An overnight window belongs to the day it opens: Friday night runs into Saturday,
        // but nothing opens on Saturday night.
        let night = window(hm(22, 0), hm(6, 0), Some(weekdays));
        assert!(night.contains(utc(2026, 6, 13, 7, 0), NY)); // Sat 03:00, opened Fri
        assert!(!night.contains(utc(2026, 6, 14, 7, 0), NY)); // Sun 03:00, opened Sat
        assert_eq!(
            night.next_open(utc(2026, 6, 13, 12, 0), NY),
            utc(2026, 6, 16, 2, 0)
        ); // Mon 22:00
    }

    #[test]
    fn window_empty_days_means_every_day() {
        let w = window(hm(9, 0), hm(17, 0), Some(vec![]));
        assert_eq!(
            w.next_open(utc(2026, 6, 13, 0, 0), UTC),
            utc(2026, 6, 13, 9, 0)
        );
    }

    #[test]
    fn window_from_equals_to_is_all_day() {
        let w = window(hm(0, 0), hm(0, 0), None);
        for t in [
            utc(2026, 3, 8, 7, 0),
            utc(2026, 11, 1, 6, 0),
            utc(2026, 6, 1, 0, 0),
        ] {
            assert!(w.contains(t, NY));
            assert_eq!(w.next_open(t, NY), t);
        }
    }

    // ---- quiet dates ----

    fn quiet(w: SendWindow, dates: &[&str]) -> SendWindow {
        SendWindow {
            skip_dates: dates.iter().map(|d| QuietDate::parse(d).unwrap()).collect(),
            ..w
        }
    }

    #[test]
    fn quiet_dates_read_yearly_and_single_dates_and_name_what_is_wrong() {
        assert_eq!(
            QuietDate::parse("12-25"),
            Ok(QuietDate::Yearly { month: 12, day: 25 })
        );
        assert_eq!(
            QuietDate::parse("2026-12-31"),
            Ok(QuietDate::Once(date(2026, 12, 31)))
        );
        assert!(QuietDate::parse("02-29").is_ok());
        for bad in [
            "02-30",
            "13-01",
            "2026-02-29",
            "12/25",
            "1-5",
            "",
            "2026-1-05",
            "xx-yy",
        ] {
            let error = QuietDate::parse(bad).unwrap_err();
            assert!(error.contains(&format!("\"{bad}\"")), "{bad}: {error}");
            assert!(error.contains("MM-DD"), "{bad}: {error}");
        }
        let leap = QuietDate::parse("02-29").unwrap();
        assert!(leap.matches(date(2028, 2, 29)));
        assert!(!leap.matches(date(2027, 2, 28)) && !leap.matches(date(2027, 3, 1)));
        assert_eq!(
            QuietDate::parse("2026-12-31").unwrap().to_string(),
            "2026-12-31"
        );
        assert_eq!(QuietDate::parse("01-05").unwrap().to_string(), "01-05");
    }

    #[test]
    fn a_quiet_date_is_the_customers_local_date() {
        let w = quiet(window(hm(9, 0), hm(17, 0), None), &["12-25"]);
        // 10:00 on Christmas in New York: closed, opens at 09:00 EST on the 26th.
        assert!(!w.contains(utc(2026, 12, 25, 15, 0), NY));
        assert_eq!(
            w.next_open(utc(2026, 12, 25, 15, 0), NY),
            utc(2026, 12, 26, 14, 0)
        );
        // 01:30 on the 25th in Kolkata is still the 24th in UTC: quiet in Kolkata.
        assert_eq!(
            w.next_open(utc(2026, 12, 24, 20, 0), KOLKATA),
            utc(2026, 12, 26, 3, 30)
        );
        // One instant, two verdicts: 02:00 UTC on the 25th is the 24th in New York.
        let all_day = quiet(SendWindow::all_day(), &["12-25"]);
        assert!(all_day.contains(utc(2026, 12, 25, 2, 0), NY));
        assert!(!all_day.contains(utc(2026, 12, 25, 2, 0), BERLIN));
        assert_eq!(
            all_day.next_open(utc(2026, 12, 25, 2, 0), BERLIN),
            utc(2026, 12, 25, 23, 0)
        );
        // A single date closes that year only.
        let once = quiet(SendWindow::all_day(), &["2026-12-31"]);
        assert!(!once.contains(utc(2026, 12, 31, 12, 0), UTC));
        assert!(once.contains(utc(2027, 12, 31, 12, 0), UTC));
    }

    #[test]
    fn quiet_dates_across_dst_changes() {
        // The spring-forward day (23 hours) in New York is quiet: open again at local midnight.
        let w = quiet(SendWindow::all_day(), &["2026-03-08"]);
        for t in [
            utc(2026, 3, 8, 5, 0),
            utc(2026, 3, 8, 6, 30),
            utc(2026, 3, 9, 3, 59),
        ] {
            assert!(!w.contains(t, NY), "{t}");
            assert_eq!(w.next_open(t, NY), utc(2026, 3, 9, 4, 0), "{t}");
        }
        assert!(w.contains(utc(2026, 3, 9, 4, 0), NY));
        // The day before is quiet: the 09:00 window opens on the first EDT day at 13:00 UTC.
        let w = quiet(window(hm(9, 0), hm(17, 0), None), &["03-07"]);
        assert_eq!(
            w.next_open(utc(2026, 3, 7, 15, 0), NY),
            utc(2026, 3, 8, 13, 0)
        );
        // The fall-back day (25 hours) is quiet in both of its 01:30s.
        let w = quiet(SendWindow::all_day(), &["11-01"]);
        for t in [
            utc(2026, 11, 1, 5, 30),
            utc(2026, 11, 1, 6, 30),
            utc(2026, 11, 2, 4, 59),
        ] {
            assert!(!w.contains(t, NY), "{t}");
            assert_eq!(w.next_open(t, NY), utc(2026, 11, 2, 5, 0), "{t}");
        }
        // Berlin changes on another day: its quiet Oct 25 ends at 23:00 UTC (CET midnight).
        let w = quiet(SendWindow::all_day(), &["10-25"]);
        assert_eq!(
            w.next_open(utc(2026, 10, 25, 12, 0), BERLIN),
            utc(2026, 10, 25, 23, 0)
        );
        // Lord Howe moves by half an hour; its quiet day still ends at its local midnight.
        let w = quiet(SendWindow::all_day(), &["2026-04-05"]);
        let next = w.next_open(utc(2026, 4, 5, 2, 0), LORD_HOWE);
        assert_eq!(
            next.with_timezone(&LORD_HOWE).date_naive(),
            date(2026, 4, 6)
        );
        assert_eq!(next.with_timezone(&LORD_HOWE).time(), hm(0, 0));
    }

    #[test]
    fn quiet_mornings_of_overnight_windows_and_long_quiet_runs() {
        // 20:00-08:00: the morning of a quiet date is closed too, and the evening's window,
        // opening on the quiet date, does not open.
        let w = quiet(window(hm(20, 0), hm(8, 0), None), &["12-25"]);
        assert!(!w.contains(utc(2026, 12, 25, 6, 0), UTC));
        assert_eq!(
            w.next_open(utc(2026, 12, 25, 6, 0), UTC),
            utc(2026, 12, 26, 20, 0)
        );
        // Eight quiet days in a row and Mondays only: beyond the 8 days a plain window needs.
        let days: Vec<String> = (24..=31).map(|d| format!("12-{d}")).collect();
        let days: Vec<&str> = days.iter().map(String::as_str).collect();
        let w = quiet(window(hm(9, 0), hm(17, 0), Some(vec![Weekday::Mon])), &days);
        // Mon 2029-12-24 and Mon 12-31 are quiet: the next Monday is 2030-01-07.
        assert_eq!(
            w.next_open(utc(2029, 12, 23, 12, 0), UTC),
            utc(2030, 1, 7, 9, 0)
        );
    }

    #[test]
    fn window_opening_inside_a_gap() {
        let w = window(hm(2, 30), hm(6, 0), None);
        // New York 2026-03-08: 02:30 does not exist; the window opens at 03:30 EDT.
        assert_eq!(
            w.next_open(utc(2026, 3, 8, 5, 0), NY),
            utc(2026, 3, 8, 7, 30)
        );
        assert!(!w.contains(utc(2026, 3, 8, 7, 15), NY)); // 03:15 EDT
        assert!(w.contains(utc(2026, 3, 8, 7, 30), NY));
        assert!(!w.contains(utc(2026, 3, 8, 10, 0), NY)); // 06:00 EDT closes it
        // Berlin 2026-03-29 likewise: 03:30 CEST = 01:30Z.
        assert_eq!(
            w.next_open(utc(2026, 3, 28, 22, 0), BERLIN),
            utc(2026, 3, 29, 1, 30)
        );
        // Lord Howe 2026-10-04: a window at 02:10 opens at 02:40 (+11).
        let lh = window(hm(2, 10), hm(5, 0), None);
        assert_eq!(
            lh.next_open(utc(2026, 10, 3, 12, 0), LORD_HOWE),
            utc(2026, 10, 3, 15, 40)
        );
    }

    #[test]
    fn window_wholly_inside_a_gap_moves_as_a_whole() {
        // 02:00-03:00 does not exist on 2026-03-08 in New York; it runs 03:00-04:00 EDT.
        let w = window(hm(2, 0), hm(3, 0), Some(vec![Weekday::Sun]));
        assert_eq!(
            w.next_open(utc(2026, 3, 8, 5, 0), NY),
            utc(2026, 3, 8, 7, 0)
        );
        assert!(w.contains(utc(2026, 3, 8, 7, 59), NY));
        assert!(!w.contains(utc(2026, 3, 8, 8, 0), NY));
    }

    #[test]
    fn window_on_the_fall_back_day() {
        // New York 2026-11-01. 22:00-06:00 from Oct 31 lasts 9 real hours.
        let w = window(hm(22, 0), hm(6, 0), None);
        let open = w.next_open(utc(2026, 10, 31, 20, 0), NY);
        assert_eq!(open, utc(2026, 11, 1, 2, 0)); // 22:00 EDT
        assert!(w.contains(utc(2026, 11, 1, 6, 30), NY)); // 01:30 EST, second pass
        assert!(w.contains(utc(2026, 11, 1, 10, 59), NY)); // 05:59 EST
        assert!(!w.contains(utc(2026, 11, 1, 11, 0), NY)); // 06:00 EST
        // A window opening in the repeated hour opens at its first pass...
        let w = window(hm(1, 30), hm(9, 0), None);
        assert_eq!(
            w.next_open(utc(2026, 11, 1, 4, 0), NY),
            utc(2026, 11, 1, 5, 30)
        );
        // ...and is still open during the second pass.
        assert!(w.contains(utc(2026, 11, 1, 6, 0), NY)); // 01:00 EST
        // Berlin 2026-10-25: 02:00-03:00 happens twice; a window closing at 02:30 closes
        // at the first 02:30 (CEST) and does not reopen during the second pass.
        let w = window(hm(1, 0), hm(2, 30), None);
        assert!(w.contains(utc(2026, 10, 25, 0, 29), BERLIN));
        assert!(!w.contains(utc(2026, 10, 25, 0, 30), BERLIN));
        assert!(!w.contains(utc(2026, 10, 25, 1, 0), BERLIN)); // 02:00 CET
        assert_eq!(
            w.next_open(utc(2026, 10, 25, 1, 0), BERLIN),
            utc(2026, 10, 26, 0, 0)
        );
    }

    // ---- anniversaries ----

    #[test]
    fn anniversary_ordinary_and_first_is_one_year() {
        let a = next_anniversary(date(2025, 6, 15), hm(9, 0), UTC, utc(2025, 6, 15, 0, 0)).unwrap();
        assert_eq!(
            a,
            Anniversary {
                at: utc(2026, 6, 15, 9, 0),
                year: 2026,
                years: 1
            }
        );
        // A not_before long before the date still yields the first anniversary.
        let a = next_anniversary(date(2025, 6, 15), hm(9, 0), UTC, utc(2000, 1, 1, 0, 0)).unwrap();
        assert_eq!((a.year, a.years), (2026, 1));
        // Later on, the coming one.
        let a = next_anniversary(date(2019, 6, 15), hm(9, 0), UTC, utc(2026, 7, 1, 0, 0)).unwrap();
        assert_eq!((a.at, a.year, a.years), (utc(2027, 6, 15, 9, 0), 2027, 8));
    }

    #[test]
    fn anniversary_at_nine_local_in_several_zones() {
        let d = date(2019, 6, 15);
        let nb = utc(2026, 1, 1, 0, 0);
        let at = |tz| next_anniversary(d, hm(9, 0), tz, nb).unwrap().at;
        assert_eq!(at(NY), utc(2026, 6, 15, 13, 0));
        assert_eq!(at(BERLIN), utc(2026, 6, 15, 7, 0));
        assert_eq!(at(KOLKATA), utc(2026, 6, 15, 3, 30));
        assert_eq!(at(LORD_HOWE), utc(2026, 6, 14, 22, 30));
        assert_eq!(at(UTC), utc(2026, 6, 15, 9, 0));
    }

    #[test]
    fn anniversary_not_before_is_inclusive() {
        let d = date(2019, 6, 15);
        let exact = utc(2026, 6, 15, 13, 0);
        let a = next_anniversary(d, hm(9, 0), NY, exact).unwrap();
        assert_eq!((a.at, a.years), (exact, 7));
        let a = next_anniversary(d, hm(9, 0), NY, exact + Duration::nanoseconds(1)).unwrap();
        assert_eq!((a.at, a.years), (utc(2027, 6, 15, 13, 0), 8));
    }

    #[test]
    fn anniversary_of_feb_29() {
        let d = date(2024, 2, 29);
        let a = next_anniversary(d, hm(9, 0), BERLIN, utc(2026, 6, 1, 0, 0)).unwrap();
        assert_eq!((a.at, a.year, a.years), (utc(2027, 2, 28, 8, 0), 2027, 3));
        let a = next_anniversary(d, hm(9, 0), BERLIN, utc(2027, 3, 1, 0, 0)).unwrap();
        assert_eq!((a.at, a.year, a.years), (utc(2028, 2, 29, 8, 0), 2028, 4));
    }

    #[test]
    fn anniversary_date_plain_date_rule() {
        let la = America::Los_Angeles;
        // Midnight UTC exactly is a plain date, even though it is the evening before in LA.
        assert_eq!(
            anniversary_date(utc(2019, 6, 15, 0, 0), la),
            date(2019, 6, 15)
        );
        assert_eq!(
            anniversary_date(utc(2019, 6, 15, 0, 0), Tz::Pacific__Honolulu),
            date(2019, 6, 15)
        );
        // A real instant near midnight UTC is the customer's local date.
        assert_eq!(
            anniversary_date(utc(2019, 6, 15, 3, 0), la),
            date(2019, 6, 14)
        );
        let almost = utc(2019, 6, 15, 0, 0) + Duration::milliseconds(1);
        assert_eq!(anniversary_date(almost, la), date(2019, 6, 14));
        // East of Greenwich the local date is the later one.
        assert_eq!(
            anniversary_date(utc(2019, 6, 14, 23, 0), BERLIN),
            date(2019, 6, 15)
        );
        assert_eq!(
            anniversary_date(utc(2019, 6, 14, 23, 0), UTC),
            date(2019, 6, 14)
        );
    }

    #[test]
    fn anniversary_inside_a_gap() {
        // 2026-03-08 is the spring-forward day in New York: 02:30 is kept at 03:30 EDT.
        let a = next_anniversary(date(2020, 3, 8), hm(2, 30), NY, utc(2026, 1, 1, 0, 0)).unwrap();
        assert_eq!((a.at, a.years), (utc(2026, 3, 8, 7, 30), 6));
        assert_eq!(a.at.with_timezone(&NY).date_naive(), date(2026, 3, 8));
    }

    #[test]
    fn anniversary_out_of_range_is_none() {
        let last = NaiveDate::MAX;
        assert_eq!(
            next_anniversary(last, hm(9, 0), UTC, utc(2026, 1, 1, 0, 0)),
            None
        );
        assert_eq!(
            next_anniversary(date(2020, 1, 1), hm(9, 0), UTC, DateTime::<Utc>::MAX_UTC),
            None
        );
    }

    // ---- cron ----

    /// croner 4's own zoned search, pinned: it moves a fixed time in a gap to the gap's end
    /// and runs interval jobs twice in an overlap. This is why next_cron steps naive times.
    #[test]
    fn croner_zoned_search_differs_from_our_rule() {
        let from = NY.with_ymd_and_hms(2026, 3, 8, 0, 0, 0).unwrap();
        let next = cron("30 2 * * *")
            .find_next_occurrence(&from, false)
            .unwrap();
        assert_eq!(next.with_timezone(&Utc), utc(2026, 3, 8, 7, 0)); // 03:00, not 03:30

        let from = NY
            .with_ymd_and_hms(2026, 11, 1, 1, 50, 0)
            .earliest()
            .unwrap();
        let next = cron("*/15 * * * *")
            .find_next_occurrence(&from, false)
            .unwrap();
        assert_eq!(next.with_timezone(&Utc), utc(2026, 11, 1, 6, 0)); // 01:00 EST, again
    }

    #[test]
    fn cron_monthly_in_two_zones() {
        let c = cron("0 9 1 * *");
        let after = utc(2026, 3, 15, 0, 0);
        assert_eq!(next_cron(&c, NY, after), Some(utc(2026, 4, 1, 13, 0)));
        assert_eq!(next_cron(&c, BERLIN, after), Some(utc(2026, 4, 1, 7, 0)));
        // Across a winter/summer change the UTC hour moves, the local hour does not.
        assert_eq!(
            next_cron(&c, BERLIN, utc(2026, 1, 15, 0, 0)),
            Some(utc(2026, 2, 1, 8, 0))
        );
        assert_eq!(next_cron(&c, KOLKATA, after), Some(utc(2026, 4, 1, 3, 30)));
    }

    #[test]
    fn cron_is_strictly_after() {
        let c = cron("0 9 1 * *");
        let at = utc(2026, 4, 1, 13, 0);
        assert_eq!(next_cron(&c, NY, at), Some(utc(2026, 5, 1, 13, 0)));
        assert_eq!(next_cron(&c, NY, at - Duration::nanoseconds(1)), Some(at));
        // A fraction of a second past a match does not return that match again.
        assert_eq!(
            next_cron(&c, NY, at + Duration::milliseconds(500)),
            Some(utc(2026, 5, 1, 13, 0))
        );
    }

    #[test]
    fn cron_daily_0230_across_spring_forward() {
        let c = cron("30 2 * * *");
        let mut t = utc(2026, 3, 7, 7, 30); // 02:30 EST on Mar 7
        let mut seen = vec![];
        for _ in 0..3 {
            t = next_cron(&c, NY, t).unwrap();
            seen.push(t);
        }
        assert_eq!(
            seen,
            vec![
                utc(2026, 3, 8, 7, 30), // 03:30 EDT, the gap's 02:30
                utc(2026, 3, 9, 6, 30), // 02:30 EDT
                utc(2026, 3, 10, 6, 30),
            ]
        );
        // Asked from inside the gap's aftermath (03:10 EDT), it still runs at 03:30.
        assert_eq!(
            next_cron(&c, NY, utc(2026, 3, 8, 7, 10)),
            Some(utc(2026, 3, 8, 7, 30))
        );
        // Berlin and Lord Howe.
        assert_eq!(
            next_cron(&c, BERLIN, utc(2026, 3, 28, 12, 0)),
            Some(utc(2026, 3, 29, 1, 30))
        );
        let lh = cron("15 2 * * *");
        let first = next_cron(&lh, LORD_HOWE, utc(2026, 10, 3, 12, 0)).unwrap();
        assert_eq!(first, utc(2026, 10, 3, 15, 45)); // 02:45 +11
        assert_eq!(
            next_cron(&lh, LORD_HOWE, first),
            Some(utc(2026, 10, 4, 15, 15))
        );
    }

    #[test]
    fn cron_daily_0130_across_fall_back() {
        let c = cron("30 1 * * *");
        let first = next_cron(&c, NY, utc(2026, 10, 31, 12, 0)).unwrap();
        assert_eq!(first, utc(2026, 11, 1, 5, 30)); // 01:30 EDT
        assert_eq!(next_cron(&c, NY, first), Some(utc(2026, 11, 2, 6, 30)));
        // Asked during the second 01:xx, it does not run again that day.
        assert_eq!(
            next_cron(&c, NY, utc(2026, 11, 1, 6, 0)),
            Some(utc(2026, 11, 2, 6, 30))
        );
        // Berlin 2026-10-25, 02:30 happens twice.
        let b = cron("30 2 * * *");
        let first = next_cron(&b, BERLIN, utc(2026, 10, 24, 12, 0)).unwrap();
        assert_eq!(first, utc(2026, 10, 25, 0, 30));
        assert_eq!(next_cron(&b, BERLIN, first), Some(utc(2026, 10, 26, 1, 30)));
    }

    /// Every local day of 2026 gets exactly one run of a daily job, whatever its hour.
    #[test]
    fn cron_daily_runs_once_per_local_day_all_year() {
        for (tz, pattern) in [
            (NY, "30 2 * * *"),
            (NY, "30 1 * * *"),
            (BERLIN, "30 2 * * *"),
            (LORD_HOWE, "45 1 * * *"),
            (LORD_HOWE, "15 2 * * *"),
            (KOLKATA, "0 9 * * *"),
            (UTC, "0 0 * * *"),
        ] {
            let c = cron(pattern);
            let mut t = resolve_local(naive(2026, 1, 1, 0, 0), tz) - Duration::seconds(1);
            let mut days = vec![];
            loop {
                t = next_cron(&c, tz, t).unwrap();
                let d = t.with_timezone(&tz).date_naive();
                if d.year() > 2026 {
                    break;
                }
                days.push(d);
            }
            let expected: Vec<_> = date(2026, 1, 1).iter_days().take(365).collect();
            assert_eq!(days, expected, "{pattern} in {tz}");
        }
    }

    #[test]
    fn cron_interval_job_through_dst_days() {
        let c = cron("*/30 * * * *");
        let count_day = |tz: Tz, d: NaiveDate| {
            let end = resolve_local(d.succ_opt().unwrap().and_time(hm(0, 0)), tz);
            let mut t = resolve_local(d.and_time(hm(0, 0)), tz) - Duration::seconds(1);
            let mut runs = vec![];
            loop {
                t = next_cron(&c, tz, t).unwrap();
                if t >= end {
                    return runs;
                }
                runs.push(t);
            }
        };
        // Spring forward: 02:00 and 02:30 fall on 03:00 and 03:30, each run once.
        let runs = count_day(NY, date(2026, 3, 8));
        assert_eq!(runs.len(), 46);
        assert!(runs.windows(2).all(|w| w[0] < w[1]));
        // Fall back: every local half hour once, at its earlier instant; the repeated hour is
        // not run twice.
        let runs = count_day(NY, date(2026, 11, 1));
        assert_eq!(runs.len(), 48);
        assert!(runs.contains(&utc(2026, 11, 1, 5, 30)));
        assert!(!runs.contains(&utc(2026, 11, 1, 6, 30)));
        assert_eq!(count_day(NY, date(2026, 6, 1)).len(), 48);
    }

    #[test]
    fn cron_that_never_occurs_again() {
        assert_eq!(
            next_cron(&cron("0 0 30 2 *"), UTC, utc(2026, 1, 1, 0, 0)),
            None
        );
        assert_eq!(
            next_cron(&cron("0 0 * * *"), UTC, DateTime::<Utc>::MAX_UTC),
            None
        );
        assert_eq!(
            next_cron(&cron("0 0 * * *"), UTC, DateTime::<Utc>::MIN_UTC),
            None
        );
        // croner's range ends at the start of the year 5000.
        assert_eq!(
            next_cron(&cron("0 0 * * *"), UTC, utc(4999, 12, 31, 12, 0)),
            Some(utc(5000, 1, 1, 0, 0))
        );
        assert_eq!(
            next_cron(&cron("0 0 * * *"), UTC, utc(5000, 1, 1, 0, 0)),
            None
        );
    }

    // ---- parse_timezone ----

    #[test]
    fn timezone_names() {
        assert_eq!(parse_timezone("Europe/Berlin"), Ok(BERLIN));
        assert_eq!(parse_timezone("UTC"), Ok(UTC));
        let err = parse_timezone("europe/berlin").unwrap_err();
        assert!(err.contains("did you mean Europe/Berlin?"), "{err}");
        assert!(err.contains("IANA"), "{err}");
        let err = parse_timezone("america/new york").unwrap_err();
        assert!(err.contains("did you mean America/New_York?"), "{err}");
        let err = parse_timezone("Kolkata").unwrap_err();
        assert!(err.contains("did you mean Asia/Kolkata?"), "{err}");
        let err = parse_timezone("Mars/Olympus").unwrap_err();
        assert!(!err.contains("did you mean"), "{err}");
        assert!(err.contains("\"Mars/Olympus\""), "{err}");
        assert!(parse_timezone("").unwrap_err().contains("empty"));
    }

    // ---- properties ----

    const ZONES: [Tz; 9] = [
        NY,
        BERLIN,
        LORD_HOWE,
        KOLKATA,
        UTC,
        America::Los_Angeles,
        America::Santiago,
        Tz::Pacific__Auckland,
        Tz::Pacific__Apia,
    ];

    fn any_zone() -> impl Strategy<Value = Tz> {
        (0..ZONES.len()).prop_map(|i| ZONES[i])
    }

    /// Instants from 1970 to 2100, to the second, weighted toward DST transitions by
    /// snapping some to the quarter hour.
    fn any_instant() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..4_102_444_800, any::<bool>()).prop_map(|(s, snap)| {
            let s = if snap { s - s.rem_euclid(900) } else { s };
            DateTime::from_timestamp(s, 0).unwrap()
        })
    }

    fn any_time() -> impl Strategy<Value = NaiveTime> {
        (0u32..24, 0u32..4).prop_map(|(h, q)| hm(h, q * 15))
    }

    fn any_window() -> impl Strategy<Value = SendWindow> {
        let weekday = (0u8..7).prop_map(|d| Weekday::try_from(d).unwrap());
        (
            any_time(),
            any_time(),
            prop::option::of(prop::collection::vec(weekday, 0..4)),
        )
            .prop_map(|(from, to, days)| SendWindow {
                from,
                to,
                days,
                skip_dates: Vec::new(),
            })
    }

    proptest! {
        #[test]
        fn next_open_is_open_soon_and_idempotent(
            w in any_window(), t in any_instant(), tz in any_zone()
        ) {
            let open = w.next_open(t, tz);
            prop_assert!(open >= t);
            prop_assert!(open - t <= Duration::days(8));
            prop_assert!(w.contains(open, tz));
            prop_assert_eq!(w.next_open(open, tz), open);
            if w.contains(t, tz) {
                prop_assert_eq!(open, t);
            }
        }

        #[test]
        fn next_open_is_earliest(w in any_window(), t in any_instant(), tz in any_zone()) {
            let open = w.next_open(t, tz);
            // No quarter-hour instant strictly between t and open is inside.
            let quarter = Duration::seconds(t.timestamp().rem_euclid(900));
            let mut probe = t + Duration::minutes(15) - quarter;
            while probe < open {
                prop_assert!(!w.contains(probe, tz), "{probe} inside before {open}");
                probe += Duration::minutes(15);
            }
        }

        #[test]
        fn next_anniversary_is_on_time_and_on_the_day(
            days in 0i64..73_000, at in any_time(), tz in any_zone(), nb in any_instant()
        ) {
            let d = date(1900, 1, 1) + Duration::days(days);
            let a = next_anniversary(d, at, tz, nb).unwrap();
            prop_assert!(a.at >= nb);
            prop_assert!(a.years >= 1);
            prop_assert_eq!(a.year, d.year() + a.years);
            let kept = a.at.with_timezone(&tz).date_naive();
            prop_assert_eq!(kept.year(), a.year);
            prop_assert_eq!(kept.month(), d.month());
            prop_assert!(
                kept.day() == d.day() || (d.month() == 2 && d.day() == 29 && kept.day() == 28),
                "{kept} for {d}"
            );
            // The one before it would have been too early (or the first one).
            if a.years > 1 {
                let earlier = next_anniversary(d, at, tz, a.at - Duration::days(400)).unwrap();
                prop_assert!(earlier.at < nb || earlier == a);
            }
        }

        #[test]
        fn next_cron_is_after_and_matches_a_local_time(
            t in any_instant(), tz in any_zone(), p in 0usize..4
        ) {
            let pattern = ["30 2 * * *", "0 9 1 * *", "*/20 * * * *", "15 1,13 * * 1-5"][p];
            let c = cron(pattern);
            let next = next_cron(&c, tz, t).unwrap();
            prop_assert!(next > t);
            let again = next_cron(&c, tz, next).unwrap();
            prop_assert!(again > next);
            // The local wall time matches the pattern, or the pattern's time is in a gap that
            // resolves to it.
            let local = next.with_timezone(&tz).naive_local();
            if !c.is_time_matching(&local).unwrap() {
                let back = (1..=24 * 4)
                    .map(|q| local - Duration::minutes(15 * q))
                    .find(|l| c.is_time_matching(l).unwrap() && resolve_local(*l, tz) == next);
                prop_assert!(back.is_some(), "{next} ({local}) for {pattern} in {tz}");
            }
        }

        #[test]
        fn nothing_panics_on_any_input(
            secs in any::<i64>(), tz_index in 0usize..chrono_tz::TZ_VARIANTS.len(),
            w in any_window(), days in any::<i32>()
        ) {
            let tz = chrono_tz::TZ_VARIANTS[tz_index];
            let (min, max) = (DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC);
            let t = DateTime::from_timestamp(secs.clamp(min.timestamp(), max.timestamp()), 0)
                .unwrap();
            let _ = resolve_local(t.naive_utc(), tz);
            let _ = w.contains(t, tz);
            let _ = w.next_open(t, tz);
            let _ = anniversary_date(t, tz);
            if let Some(d) = NaiveDate::from_num_days_from_ce_opt(days) {
                let _ = next_anniversary(d, hm(9, 0), tz, t);
            }
            let _ = next_cron(&cron("30 2 * * *"), tz, t);
            let _ = parse_timezone(&format!("{secs}/{days}"));
        }
    }

    #[test]
    fn apia_skipped_a_whole_day() {
        // Samoa skipped 2011-12-30 (from -10 to +14). A local time that day moves a day on.
        let apia = Tz::Pacific__Apia;
        let t = resolve_local(naive(2011, 12, 30, 10, 0), apia);
        assert_eq!(
            t.with_timezone(&apia).naive_local(),
            naive(2011, 12, 31, 10, 0)
        );
        let c = cron("0 10 * * *");
        let first = next_cron(&c, apia, utc(2011, 12, 29, 0, 0)).unwrap();
        assert_eq!(
            first.with_timezone(&apia).naive_local(),
            naive(2011, 12, 29, 10, 0)
        );
        let second = next_cron(&c, apia, first).unwrap();
        assert_eq!(second, t);
        let third = next_cron(&c, apia, second).unwrap();
        assert_eq!(
            third.with_timezone(&apia).naive_local(),
            naive(2012, 1, 1, 10, 0)
        );
    }
}
