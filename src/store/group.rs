//! Group commit without a task of its own: callers queue their request, then take turns at
//! one lock; whoever holds it commits everything queued so far in one transaction and answers
//! each request. While one group commits (waiting for the disk), the next one gathers, so one
//! durable commit serves as many requests as arrived during the previous one.
//!
//! A caller that is dropped while it commits for others (a hard stop) drops their answers:
//! they see an error and must not send, which is the safe side of the body fence.

use std::future::Future;
use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{StoreError, StoreResult};

type Waiting<R, A> = (R, oneshot::Sender<StoreResult<A>>);

pub(super) struct GroupCommit<R, A> {
    queued: Mutex<Vec<Waiting<R, A>>>,
    turn: tokio::sync::Mutex<()>,
}

impl<R, A> Default for GroupCommit<R, A> {
    fn default() -> Self {
        GroupCommit {
            queued: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl<R, A> std::fmt::Debug for GroupCommit<R, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupCommit")
    }
}

impl<R: Send, A: Send> GroupCommit<R, A> {
    /// Queues `request` and returns its answer once some group containing it committed.
    /// `commit` runs one group, in the order the requests were queued, and answers each.
    pub(super) async fn submit<F, Fut>(&self, request: R, commit: F) -> StoreResult<A>
    where
        F: Fn(Vec<R>) -> Fut,
        Fut: Future<Output = StoreResult<Vec<A>>>,
    {
        let (answer, mut answered) = oneshot::channel();
        self.lock_queue().push((request, answer));
        let turn = self.turn.lock().await;
        // The previous holder may have committed our request with its group.
        match answered.try_recv() {
            Ok(result) => return result,
            Err(oneshot::error::TryRecvError::Closed) => return Err(dropped()),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        let group = std::mem::take(&mut *self.lock_queue());
        // A caller that gave up waiting (dropped at the hard stop) will not send: committing
        // its fence would leave a `body` phase for a body that never goes out.
        let (requests, answers): (Vec<R>, Vec<_>) = group
            .into_iter()
            .filter(|(_, answer)| !answer.is_closed())
            .unzip();
        let size = requests.len();
        match commit(requests).await {
            Ok(results) if results.len() == size => {
                for (answer, result) in answers.into_iter().zip(results) {
                    let _ = answer.send(Ok(result));
                }
            }
            Ok(_) => answer_all(answers, || {
                StoreError::Invalid("a group commit answered the wrong number of requests".into())
            }),
            Err(error) => {
                let text = error.to_string();
                let retry = error.is_unavailable();
                answer_all(answers, || group_failed(&text, retry));
            }
        }
        drop(turn);
        answered.await.unwrap_or_else(|_| Err(dropped()))
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, Vec<Waiting<R, A>>> {
        // A panic while pushing or taking cannot leave the vector half-changed.
        self.queued.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn answer_all<A>(answers: Vec<oneshot::Sender<StoreResult<A>>>, error: impl Fn() -> StoreError) {
    for answer in answers {
        let _ = answer.send(Err(error()));
    }
}

/// Every request of a failed group gets the group's error (the database error itself cannot be
/// copied), still telling whether trying again can succeed.
fn group_failed(text: &str, retry: bool) -> StoreError {
    let message = format!("the group commit failed: {text}");
    if retry {
        StoreError::Unavailable(sqlx::Error::Protocol(message))
    } else {
        StoreError::Invalid(message)
    }
}

fn dropped() -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(
        "the group commit was abandoned (shutting down)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_share_commits_and_each_gets_its_own_answer() {
        let group: Arc<GroupCommit<u32, u32>> = Arc::default();
        let commits = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for n in 0..64u32 {
            let (group, commits) = (group.clone(), commits.clone());
            tasks.push(tokio::spawn(async move {
                group
                    .submit(n, |requests| {
                        let commits = commits.clone();
                        async move {
                            commits.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            Ok(requests.into_iter().map(|r| r * 2).collect())
                        }
                    })
                    .await
            }));
        }
        for (n, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.expect("task").expect("answer"), 2 * n as u32);
        }
        let commits = commits.load(Ordering::SeqCst);
        assert!(
            commits < 64,
            "{commits} commits for 64 requests: nothing was grouped"
        );
    }

    #[tokio::test]
    async fn a_failed_group_fails_each_request_and_keeps_retryability() {
        let group: GroupCommit<u32, u32> = GroupCommit::default();
        let result = group
            .submit(1, |_| async {
                Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
            })
            .await;
        assert!(result.is_err_and(|e| e.is_unavailable()));
    }
}
