//! The HTTP listener's accept loop: a cap on open connections and timeouts on every stage of
//! a request, so that idle, slow or too many connections cannot use up the daemon's file
//! descriptors (which sending needs for the database, SMTP and the outbox).
//!
//! - At most `max_connections` connections are open at once, lowered at start to what the
//!   open-files limit leaves after the database, SMTP, sources and the outbox have their share
//!   ([`Budget`]). When a new connection arrives at the cap, the oldest connection
//!   without a request in progress (idle, or still sending its request head) is closed to make
//!   room: idle clients cannot crowd out new ones. When every connection is in the middle of a
//!   request, accepting pauses and new connections wait in the kernel's backlog, holding no
//!   descriptor of ours.
//! - A request head must arrive within `header_read_timeout` of its first byte, a request body
//!   within `body_read_timeout` of its head, and a connection may wait for its next request at
//!   most `idle_timeout`. A connection that misses one is closed.
//! - Connection tasks run on the daemon's task tracker: on shutdown, idle connections close at
//!   once and requests in progress finish (until the hard stop).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::ConnectInfo;
use chrono::TimeDelta;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `[http]` in the config: the listener's address and limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the health, metrics and web listener; empty to turn it off.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Connections open at once. At the cap the oldest idle connection is closed for a new
    /// one; lowered at start to what the open-files limit leaves after the database, SMTP and
    /// the outbox (see [`Budget`]).
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// A request's head (request line and headers) must arrive within this of its first byte
    /// (of the connection, for its first request).
    #[serde(
        default = "default_header_read_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub header_read_timeout: TimeDelta,
    /// A request's body must arrive within this of its head.
    #[serde(
        default = "default_body_read_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub body_read_timeout: TimeDelta,
    /// How long a kept-alive connection may wait for its next request.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "crate::settings::duration"
    )]
    pub idle_timeout: TimeDelta,
}
impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
            max_connections: default_http_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}
fn default_listen() -> String {
    "127.0.0.1:8025".into()
}
fn default_http_max_connections() -> usize {
    512
}
fn default_header_read_timeout() -> TimeDelta {
    TimeDelta::seconds(10)
}
fn default_body_read_timeout() -> TimeDelta {
    TimeDelta::seconds(30)
}
/// Longer than reverse proxies keep idle upstream connections by default (nginx 60 s), so the
/// proxy, not touchpoint, closes them: no request is lost to a connection closed under it.
fn default_idle_timeout() -> TimeDelta {
    TimeDelta::seconds(75)
}

/// What bounds the listener, from `[http]` (with `max_connections` already fitted to the
/// open-files limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
}

/// A request head (request line and headers) larger than this is refused: it bounds the
/// memory one connection can make the daemon hold (hyper's default is ~400 KiB).
const MAX_HEAD_BUFFER: usize = 64 * 1024;

/// Descriptors kept for what the daemon opens besides connections and pools: outbox files,
/// DNS lookups, SQLite's journal and temporary files, log files, the notify socket.
const FD_HEADROOM: u64 = 32;

/// A connection count the listener keeps in any case, even under a tiny open-files limit.
const MIN_CONNECTIONS: usize = 4;

/// The stop signals of the daemon: `graceful` lets requests in progress finish, `hard` ends
/// every connection.
#[derive(Debug, Clone)]
pub struct Stop {
    pub graceful: CancellationToken,
    pub hard: CancellationToken,
}

/// How many descriptors the listener may use: what the open-files limit leaves after those
/// open now and those the database pool, SMTP pool, sources and outbox may still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` (systemd's `LimitNOFILE=`), if it could be read.
    pub open_files_limit: Option<u64>,
    pub open_now: u64,
    pub reserved: u64,
}

impl Budget {
    /// This process's limit and open descriptors, from /proc.
    pub fn of_this_process(others: &OtherDescriptors) -> Budget {
        Budget {
            open_files_limit: open_files_limit(),
            open_now: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64),
            reserved: others.reserved(),
        }
    }

    /// The connection cap: the configured one, lowered to what the budget allows.
    pub fn connection_cap(&self, configured: usize) -> usize {
        let Some(limit) = self.open_files_limit else {
            return configured;
        };
        let free = limit.saturating_sub(self.open_now + self.reserved);
        configured.min(
            usize::try_from(free)
                .unwrap_or(usize::MAX)
                .max(MIN_CONNECTIONS),
        )
    }
}

/// What else the daemon opens that may still need descriptors, from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherDescriptors {
    /// `database.max_connections`, and whether the database is SQLite.
    pub database_connections: u32,
    pub database_is_sqlite: bool,
    /// `transport.smtp.pool_size`.
    pub smtp_connections: usize,
    /// Each source's `max_connections`.
    pub source_connections: Vec<u32>,
}

impl OtherDescriptors {
    /// Descriptors the rest of the daemon may still open: SQLite holds a database, a WAL and a
    /// shared-memory file per connection (readers plus the writer); PostgreSQL one socket.
    fn reserved(&self) -> u64 {
        let pool = |connections: u32, sqlite: bool| {
            if sqlite {
                3 * (u64::from(connections) + 1)
            } else {
                u64::from(connections)
            }
        };
        let database = pool(self.database_connections, self.database_is_sqlite);
        let smtp = self.smtp_connections as u64;
        // A source's URL is not known to be SQLite or PostgreSQL here without parsing it again:
        // count the larger.
        let sources: u64 = self
            .source_connections
            .iter()
            .map(|&connections| pool(connections, true))
            .sum();
        database + smtp + sources + FD_HEADROOM
    }
}

/// The soft limit on open files, from /proc/self/limits ("Max open files  1024  524288  files").
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The listener's limits from the config, with the cap fitted to `budget`; says in the log
/// when the cap had to be lowered.
pub fn limits(http: &HttpConfig, budget: &Budget) -> Limits {
    let configured = http.max_connections;
    let cap = budget.connection_cap(configured);
    if cap < configured {
        tracing::warn!(
            configured,
            cap,
            open_files_limit = budget.open_files_limit,
            open_now = budget.open_now,
            reserved = budget.reserved,
            "http.max_connections lowered to fit the open-files limit (LimitNOFILE), keeping \
             descriptors for the database, SMTP and the outbox; raise LimitNOFILE to allow more"
        );
    }
    let seconds =
        |d: chrono::TimeDelta, fallback: u64| d.to_std().unwrap_or(Duration::from_secs(fallback));
    Limits {
        max_connections: cap,
        header_read_timeout: seconds(http.header_read_timeout, 10),
        body_read_timeout: seconds(http.body_read_timeout, 30),
        idle_timeout: seconds(http.idle_timeout, 75),
    }
}

/// Serves `router` on `listener` until `stop.graceful`; connection tasks go on `tracker`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tracker: TaskTracker,
    stop: Stop,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let open = Arc::new(OpenConnections::default());
    let mut accept_errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            () = stop.graceful.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                accept_errors.report(&error);
                // EMFILE and the like: give the daemon time to close something.
                tokio::select! {
                    () = stop.graceful.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let Some(permit) = slot(&slots, &open, &stop.graceful).await else {
            return;
        };
        let connection = Connection {
            activity: open.register(),
            open: open.clone(),
            limits,
            stop: stop.clone(),
        };
        tracker.spawn(connection.serve(stream, peer, router.clone(), permit));
    }
}

/// A connection slot: a free one, or one freed by closing the oldest connection that has no
/// request in progress; else waits until a request ends. `None` on shutdown.
async fn slot(
    slots: &Arc<Semaphore>,
    open: &OpenConnections,
    shutdown: &CancellationToken,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    if open.evict_oldest_idle() {
        tracing::debug!("connection cap reached: closed the oldest idle connection");
    }
    tokio::select! {
        () = shutdown.cancelled() => None,
        permit = slots.clone().acquire_owned() => permit.ok(),
    }
}

/// Logs failed accepts at most once a minute (each is also a debug line).
#[derive(Default)]
struct AcceptErrors {
    last_warned: Option<Instant>,
}

impl AcceptErrors {
    fn report(&mut self, error: &std::io::Error) {
        let due = self
            .last_warned
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60));
        if due {
            tracing::warn!(%error, "the HTTP listener cannot accept a connection; retrying");
            self.last_warned = Some(Instant::now());
        } else {
            tracing::debug!(%error, "cannot accept a connection");
        }
    }
}

/// The open connections in the order they were accepted, for closing the oldest idle one.
#[derive(Default)]
struct OpenConnections {
    next_id: AtomicU64,
    by_age: Mutex<BTreeMap<u64, Arc<Activity>>>,
}

impl OpenConnections {
    fn register(&self) -> Arc<Activity> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new(id));
        if let Ok(mut open) = self.by_age.lock() {
            open.insert(id, activity.clone());
        }
        activity
    }

    fn remove(&self, id: u64) {
        if let Ok(mut open) = self.by_age.lock() {
            open.remove(&id);
        }
    }

    /// Asks the oldest connection without a request in progress to close; false if every
    /// connection is busy.
    fn evict_oldest_idle(&self) -> bool {
        let Ok(mut open) = self.by_age.lock() else {
            return false;
        };
        let victim = open
            .iter()
            .find(|(_, activity)| !activity.busy())
            .map(|(id, _)| *id);
        match victim.and_then(|id| open.remove(&id)) {
            Some(activity) => {
                activity.evicted.cancel();
                true
            }
            None => false,
        }
    }
}

/// Milliseconds value that means "not set".
const NEVER: u64 = u64::MAX;

/// What one connection is doing, for its timeouts: written by its socket and its requests,
/// read by its watchdog (all on the connection's own task; atomics only to be `Sync`).
struct Activity {
    id: u64,
    started: Instant,
    /// Requests whose head has arrived and whose response is not yet fully written.
    in_flight: AtomicUsize,
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: AtomicU64,
    /// The first byte of the next request head, if one has begun to arrive; a new connection
    /// counts as having begun its first at once (nobody connects to wait).
    head_started: AtomicU64,
    /// Wakes the watchdog when a deadline may have moved.
    changed: Notify,
    /// Cancelled to close this connection to make room for a new one.
    evicted: CancellationToken,
}

/// Why the watchdog closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    SlowHead,
}

impl Activity {
    fn new(id: u64) -> Activity {
        Activity {
            id,
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            changed: Notify::new(),
            evicted: CancellationToken::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(NEVER - 1)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0
    }

    /// Bytes came in: between requests, that is the start of a request head.
    fn bytes_read(&self) {
        if !self.busy()
            && self
                .head_started
                .compare_exchange(NEVER, self.now(), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.changed.notify_one();
        }
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NEVER, Ordering::Relaxed);
        RequestGuard {
            activity: self.clone(),
        }
    }

    fn request_finished(&self) {
        self.idle_since.store(self.now(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// When this connection's wait runs out and why; `None` while a request is in progress
    /// (its body has its own deadline).
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        if self.busy() {
            return None;
        }
        let at =
            |millis: u64, timeout: Duration| self.started + Duration::from_millis(millis) + timeout;
        match self.head_started.load(Ordering::Relaxed) {
            NEVER => Some((
                at(self.idle_since.load(Ordering::Relaxed), limits.idle_timeout),
                Expiry::Idle,
            )),
            started => Some((at(started, limits.header_read_timeout), Expiry::SlowHead)),
        }
    }
}

/// Marks a request in progress until its response has been written (or dropped).
struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.request_finished();
    }
}

/// One accepted connection and what it needs to serve itself.
struct Connection {
    activity: Arc<Activity>,
    open: Arc<OpenConnections>,
    limits: Limits,
    stop: Stop,
}

impl Connection {
    async fn serve(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        router: Router,
        _permit: OwnedSemaphorePermit,
    ) {
        let activity = self.activity.clone();
        let io = TokioIo::new(Watched {
            stream,
            activity: activity.clone(),
        });
        let service = request_service(router, peer, activity.clone(), self.limits);
        let mut builder = http1::Builder::new();
        builder
            .max_buf_size(MAX_HEAD_BUFFER)
            .header_read_timeout(None);
        let mut connection = pin!(builder.serve_connection(io, service));
        let mut draining = false;
        loop {
            let deadline = activity.deadline(&self.limits);
            let wake_at = deadline.map(|(at, _)| tokio::time::Instant::from_std(at));
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "HTTP connection ended with an error");
                    }
                    break;
                }
                () = sleep_until(wake_at) => {
                    if let Some((at, why)) = activity.deadline(&self.limits)
                        && Instant::now() >= at
                    {
                        tracing::debug!(%peer, ?why, "closing an HTTP connection that timed out");
                        break;
                    }
                }
                () = activity.changed.notified() => {}
                () = activity.evicted.cancelled() => break,
                () = self.stop.hard.cancelled() => break,
                () = self.stop.graceful.cancelled(), if !draining => {
                    if !activity.busy() {
                        break;
                    }
                    connection.as_mut().graceful_shutdown();
                    draining = true;
                }
            }
        }
        self.open.remove(activity.id);
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The router as hyper calls it, per request: the peer's address for handlers, the body read
/// under its deadline, and the request counted as in progress until its response is written.
fn request_service(
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
    limits: Limits,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = hyper::Response<GuardedBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<hyper::Response<GuardedBody>, Infallible>> + Send,
> + Clone {
    let router = TowerToHyperService::new(router);
    hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let guard = activity.request_started();
        let deadline = tokio::time::Instant::now() + limits.body_read_timeout;
        let mut request = request.map(|body| DeadlineBody::new(body, deadline));
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = hyper::service::Service::call(&router, request);
        async move {
            let response = response.await?;
            Ok(response.map(|body| GuardedBody {
                body,
                _guard: guard,
            }))
        }
    })
}

/// A request body that fails once its deadline passes, so a client that sends its body slowly
/// (or not at all) gets an error and its connection closed instead of holding it open.
struct DeadlineBody {
    body: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl DeadlineBody {
    fn new(body: Incoming, deadline: tokio::time::Instant) -> DeadlineBody {
        DeadlineBody {
            body,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body did not arrive in time (http.body_read_timeout)")]
    TimedOut,
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending if this.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Some(Err(BodyError::TimedOut)))
            }
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(BodyError::from))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A response body that keeps its request counted as in progress until it is written.
struct GuardedBody {
    body: axum::body::Body,
    _guard: RequestGuard,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The socket, telling the connection's [`Activity`] when bytes come in.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.bytes_read();
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 8,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
        }
    }

    #[test]
    fn a_connection_gets_header_read_timeout_for_a_head_and_idle_timeout_between_requests() {
        let activity = Arc::new(Activity::new(0));
        // A new connection: its first head is due within header_read_timeout.
        let (at, why) = activity.deadline(&limits()).unwrap();
        assert_eq!(why, Expiry::SlowHead);
        assert_eq!(at, activity.started + Duration::from_secs(10));
        let guard = activity.request_started();
        assert_eq!(activity.deadline(&limits()), None, "busy: no deadline");
        // Body bytes while busy do not start a head.
        activity.bytes_read();
        drop(guard);
        // Between requests: idle_timeout, until the next head begins.
        let (at, why) = activity.deadline(&limits()).unwrap();
        assert_eq!(why, Expiry::Idle);
        assert!(at >= activity.started + Duration::from_secs(75));
        activity.bytes_read();
        let (_, why) = activity.deadline(&limits()).unwrap();
        assert_eq!(why, Expiry::SlowHead);
    }

    #[test]
    fn only_connections_without_a_request_in_progress_are_evicted() {
        let open = OpenConnections::default();
        let first = open.register();
        let second = open.register();
        let _busy = first.request_started();
        assert!(open.evict_oldest_idle());
        assert!(!first.evicted.is_cancelled());
        assert!(second.evicted.is_cancelled());
        assert!(!open.evict_oldest_idle(), "only a busy one is left");
    }

    #[test]
    fn the_cap_leaves_descriptors_for_the_rest_of_the_daemon() {
        let budget = Budget {
            open_files_limit: Some(256),
            open_now: 20,
            reserved: 100,
        };
        assert_eq!(budget.connection_cap(512), 136);
        assert_eq!(budget.connection_cap(50), 50);
        let tiny = Budget {
            open_files_limit: Some(64),
            ..budget.clone()
        };
        assert_eq!(tiny.connection_cap(512), MIN_CONNECTIONS);
        let unknown = Budget {
            open_files_limit: None,
            ..budget
        };
        assert_eq!(unknown.connection_cap(512), 512);
    }
}
