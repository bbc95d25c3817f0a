//! Claiming ahead: the dispatcher claims up to a few messages per connection in one statement
//! and reads what their checks need for the whole batch in a few more queries, then hands the
//! claims to the connections one by one, oldest due first. Only messages due now are claimed,
//! so none waits behind one claimed for later; each replica holds a few per connection at most,
//! so replicas still share the work.
//!
//! The facts read for a batch are used only while they are fresh ([`FRESH_FOR`]); a claim that
//! waited longer reads its own, as if it had been claimed alone. Whatever they say, the body
//! fence checks the claim, the expiry and the suppression list again in the same write.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::Context;
use crate::playbook::Playbook;
use crate::rules::Unless;
use crate::store::{ClaimedMessage, FactsWanted, Finishing, Outcome, SendFacts, StoreError};

/// Claims held per SMTP connection, at most: enough that a claim and its reads serve several
/// messages, few enough that a message waits only for the few ahead of it.
const PER_CONNECTION: usize = 4;

/// How long a batch's facts stand in for a message's own reads.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(1);

/// A claimed message waiting for a connection.
pub(super) struct Queued {
    pub claim: ClaimedMessage,
    /// The batch's facts, when they could be read.
    pub facts: Option<Arc<SendFacts>>,
    read_at: Instant,
    /// When the claim's lease ends at the earliest, by this process's clock: the lease counted
    /// from before the claim was asked for (the database dated it later).
    pub lease_ends: Instant,
}

impl Queued {
    /// The batch's facts if they are still fresh enough to stand in for reading them now.
    pub fn fresh_facts(&self) -> Option<&SendFacts> {
        let fresh = self.read_at.elapsed() <= FRESH_FOR;
        self.facts.as_deref().filter(|_| fresh)
    }
}

/// The claims this dispatcher holds and has not started yet, oldest due first.
pub(super) struct Queue {
    items: VecDeque<Queued>,
    /// The most claims held at once.
    capacity: usize,
    /// Whether the last claim filled its batch (so more may be due).
    more_due: bool,
}

impl Queue {
    pub fn new(connections: usize, batch_size: u32) -> Queue {
        let capacity = (connections * PER_CONNECTION)
            .min(batch_size as usize)
            .max(1);
        Queue {
            items: VecDeque::with_capacity(capacity),
            capacity,
            more_due: true,
        }
    }

    /// Whether to claim more now: when nothing is held, or the queue runs short while more
    /// may be due (claiming before it is empty keeps the connections busy).
    pub fn wants_more(&self, connections: usize) -> bool {
        let short = self.more_due && self.items.len() < connections && self.room() > 0;
        self.items.is_empty() || short
    }

    /// How many to claim to fill the queue.
    pub fn room(&self) -> u32 {
        self.capacity.saturating_sub(self.items.len()) as u32
    }

    pub fn pop(&mut self) -> Option<Queued> {
        self.items.pop_front()
    }

    /// Claims a batch into the queue and reads their facts. A failure to read the facts only
    /// means each message reads its own.
    pub async fn fill(&mut self, context: &Context) -> Result<usize, StoreError> {
        let settings = &context.settings;
        let asked = self.room();
        let lease_ends = Instant::now() + settings.lease.to_std().unwrap_or_default();
        let claims = context
            .store
            .claim_due(&settings.instance, asked, settings.lease)
            .await?;
        self.more_due = claims.len() as u32 >= asked;
        if claims.is_empty() {
            return Ok(0);
        }
        let playbook = context.playbook.borrow().clone();
        let wanted = wanted(&playbook, &claims);
        let read_at = Instant::now();
        let facts = match context.store.send_facts(&wanted).await {
            Ok(facts) => Some(Arc::new(facts)),
            Err(error) => {
                tracing::warn!(%error, "cannot read the checks' facts for a batch; each message reads its own");
                None
            }
        };
        let count = claims.len();
        self.items.extend(claims.into_iter().map(|claim| Queued {
            claim,
            facts: facts.clone(),
            read_at,
            lease_ends,
        }));
        Ok(count)
    }

    /// Gives every held claim back, due again at `at`, in one write. Not through the completer:
    /// its room is for outcomes of sends, and while the database is away it can stay full for
    /// a long time; these claims never reached their phase write, so a release that cannot be
    /// written costs only their lease (the reaper reschedules them).
    pub async fn release_all(&mut self, context: &Context, at: DateTime<Utc>, reason: &str) {
        if self.items.is_empty() {
            return;
        }
        let held: Vec<Queued> = self.items.drain(..).collect();
        let outcome = Outcome::Released {
            at,
            reason: reason.to_string(),
        };
        let releases: Vec<Finishing<'_>> = held
            .iter()
            .map(|queued| Finishing {
                id: queued.claim.id,
                token: &queued.claim.token,
                outcome: &outcome,
            })
            .collect();
        let written = tokio::time::timeout(RELEASE_WITHIN, context.store.finish_all(&releases));
        match written.await {
            Ok(Ok(_)) => {
                tracing::debug!(count = held.len(), %reason, "released the claims held ahead")
            }
            Ok(Err(error)) => {
                tracing::warn!(count = held.len(), %error, "cannot release the claims held ahead; their leases will run out")
            }
            Err(_) => {
                tracing::warn!(
                    count = held.len(),
                    "releasing the claims held ahead took too long; their leases will run out"
                )
            }
        }
    }
}

/// How long releasing the held claims may take: the dispatcher's loop waits for it.
const RELEASE_WITHIN: Duration = Duration::from_secs(5);

/// What the checks of these claims will read: their customers and events, the owner's address
/// (rules `to = "owner"`), and every event kind an `unless` names.
fn wanted(playbook: &Playbook, claims: &[ClaimedMessage]) -> FactsWanted {
    let mut wanted = FactsWanted {
        customer_ids: claims.iter().map(|c| c.customer_id.clone()).collect(),
        event_ids: claims.iter().filter_map(|c| c.event_id.clone()).collect(),
        addresses: playbook.business.owner_email.iter().cloned().collect(),
        unless_kinds: Vec::new(),
    };
    for rule in &playbook.rules.rules {
        for condition in &rule.unless {
            let kind = match condition {
                Unless::SinceTrigger { event } | Unless::Within { event, .. } => event,
            };
            if !wanted.unless_kinds.contains(kind) {
                wanted.unless_kinds.push(kind.clone());
            }
        }
    }
    wanted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(id: i64) -> ClaimedMessage {
        let now = Utc::now();
        ClaimedMessage {
            id,
            token: "t".into(),
            rule: "r".into(),
            customer_id: format!("c{id}"),
            event_id: None,
            trigger_at: now,
            due_at: now,
            expires_at: None,
            attempts: 1,
            detail: serde_json::json!({}),
        }
    }

    #[test]
    fn the_queue_holds_a_few_per_connection_and_never_more_than_a_batch() {
        assert_eq!(Queue::new(8, 50).room(), 32);
        assert_eq!(Queue::new(8, 10).room(), 10);
        assert_eq!(Queue::new(0, 0).room(), 1);
    }

    #[test]
    fn the_queue_refills_when_empty_or_short_while_more_may_be_due() {
        let mut queue = Queue::new(2, 50);
        assert!(queue.wants_more(2), "empty");
        queue.items.extend((1..=3).map(|id| Queued {
            claim: claim(id),
            facts: None,
            read_at: Instant::now(),
            lease_ends: Instant::now(),
        }));
        assert!(!queue.wants_more(2), "enough for every connection");
        assert_eq!(queue.pop().map(|q| q.claim.id), Some(1), "oldest first");
        assert_eq!(queue.pop().map(|q| q.claim.id), Some(2));
        assert!(
            queue.wants_more(2),
            "short, and the last claim filled its batch"
        );
        queue.more_due = false;
        assert!(!queue.wants_more(2), "short, but nothing more was due");
        queue.pop();
        assert!(queue.wants_more(2), "empty again");

        // A batch smaller than the connections: full is full.
        let mut small = Queue::new(4, 2);
        small.items.extend((1..=2).map(|id| Queued {
            claim: claim(id),
            facts: None,
            read_at: Instant::now(),
            lease_ends: Instant::now(),
        }));
        assert!(!small.wants_more(4), "no room left");
    }

    #[test]
    fn a_batch_s_facts_stand_in_only_while_fresh() {
        let read = |ago: Duration| Queued {
            claim: claim(1),
            facts: Some(Arc::new(SendFacts::default())),
            read_at: Instant::now() - ago,
            lease_ends: Instant::now(),
        };
        assert!(read(Duration::ZERO).fresh_facts().is_some());
        let stale = read(FRESH_FOR + Duration::from_millis(50));
        assert!(
            stale.fresh_facts().is_none(),
            "older: the message reads its own"
        );
        let unread = Queued {
            facts: None,
            ..read(Duration::ZERO)
        };
        assert!(unread.fresh_facts().is_none());
    }
}
