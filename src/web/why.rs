//! Why a message exists and why it was allowed to go out, in words for the business owner.
//!
//! The words belong to the rules (`rules::explain`), next to what they describe. The
//! dispatcher's guard records every check it ran ([`crate::rules::CheckRecord`]) and keeps each
//! with its verdict (passed, failed, not reached) with the message (`messages.checks`), for
//! messages it sent and for those its checks stopped, so the message page shows what was checked
//! at the time, not what the rule says today; [`conditions`] is the rule as written today, for
//! messages that have no such record.

pub use crate::rules::explain::{conditions, trigger};
