//! Why a message exists and why it was allowed to go out, in words for the business owner.
//!
//! The words belong to the rules (`rules::explain`), next to what they describe. The
//! dispatcher's guard records every check it ran ([`CheckRecord`]) and keeps the lines of
//! those that passed with the message (`messages.checks`), so the message page shows what was
//! checked at the time, not what the rule says today; [`conditions`] is the rule as written
//! today, for messages that have no such record.

use crate::rules::CheckRecord;
pub use crate::rules::explain::{conditions, trigger};

/// What the guard found just before sending, one line per check that ran, with the values it
/// saw.
pub fn checks_passed(record: &CheckRecord) -> Vec<String> {
    record.passed_lines()
}
