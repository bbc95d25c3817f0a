#![allow(dead_code)]
//! A real SMTP server on loopback for integration tests.
//!
//! [`SmtpPeer`] speaks enough of RFC 5321 for lettre's client (greeting, EHLO/HELO, AUTH PLAIN
//! and LOGIN accepting any credentials, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT;
//! anything else gets 502), records every message it accepted, and misbehaves on command
//! ([`Fault`]). It runs on tokio tasks of the runtime that started it and stops when dropped.
//!
//! Timing of faults: a fault set with [`SmtpPeer::set_fault`] is read when a connection is opened
//! (for [`Fault::DropOnConnect`] and [`Fault::Greeting421`]) and when a transaction starts (at
//! MAIL FROM, for everything else); changing it does not affect a transaction already under way.
//! A recipient fault ([`SmtpPeer::fault_for_recipient`]) is read at the RCPT command whose address
//! contains the needle and takes precedence over the global fault from there on (see
//! [`SmtpPeer::fault_for_recipient`]).
//!
//! A message is recorded as accepted at the moment the server decides to answer 2xx to the final
//! dot, before the (possibly delayed) reply is written: like a real server, it has taken
//! responsibility for the message whether or not the client hears the answer.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The SIZE the peer advertises; larger messages are refused with 552 after the final dot.
pub const MAX_MESSAGE_SIZE: usize = 52_428_800;
/// Longest command line accepted (RFC 5321 asks for 512; AUTH lines can be longer).
pub const MAX_COMMAND_LINE: usize = 8192;
/// Most recipients accepted in one transaction.
const MAX_RECIPIENTS: usize = 1000;
/// How long `start_on` keeps retrying a port that is still held by a peer being dropped.
const REBIND_PATIENCE: Duration = Duration::from_secs(5);

/// One message the peer answered 2xx to after the final dot.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The reverse path of MAIL FROM, without the angle brackets (empty for the null path).
    pub mail_from: String,
    /// The accepted RCPT TO addresses, without angle brackets, in order.
    pub rcpt_to: Vec<String>,
    /// The message as received, dot-unstuffed, ending with the CRLF before the final dot.
    pub data: Vec<u8>,
    /// The Message-ID header's value without the angle brackets.
    pub message_id: Option<String>,
    pub accepted_at: Instant,
    /// Which connection carried it: 0 for the first one the peer accepted, 1 for the next...
    pub connection: usize,
    /// The user name the connection authenticated as, if it did.
    pub auth_user: Option<String>,
}

/// A stage of a mail transaction, for faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The MAIL FROM command.
    Mail,
    /// Each RCPT TO command.
    Rcpt,
    /// The DATA command (a `Reply` with code 354 lets the message through).
    Data,
    /// The reply to the final ".".
    AfterDot,
}

/// A way for the peer to misbehave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Close the connection immediately after accept, without a greeting.
    DropOnConnect,
    /// Greet with "421 4.3.2 Service not available" and close.
    Greeting421,
    /// Reply with this code and text at the given stage instead of the normal reply. The state
    /// machine follows the code: 2xx at Mail/Rcpt/AfterDot acts as success (a 2xx after the dot
    /// records the message), 354 at Data proceeds to the message, anything else refuses the
    /// step. 421 closes the connection after the reply, as real servers do. A `\n` in the text
    /// makes a multi-line reply.
    Reply {
        at: Stage,
        code: u16,
        text: String,
    },
    /// Close the connection (no reply) when the stage's command arrives. At `AfterDot`, the
    /// whole message is read first and is not recorded.
    HangUp {
        at: Stage,
    },
    /// Read the whole message including the final dot, then never reply; the socket stays open
    /// (what the client sends afterwards is read and ignored) until the client closes it.
    /// Not recorded as accepted.
    SilentAfterDot,
    /// Record the message as accepted, then close without sending the 250: the server took it
    /// but the client never heard.
    AcceptThenHangUp,
}

/// What the peer does at one step.
enum Action {
    Normal,
    Reply(u16, String),
    HangUp,
}

fn stage_action(fault: &Fault, stage: Stage) -> Action {
    match fault {
        Fault::Reply { at, code, text } if *at == stage => Action::Reply(*code, text.clone()),
        Fault::HangUp { at } if *at == stage => Action::HangUp,
        _ => Action::Normal,
    }
}

#[derive(Default)]
struct Faults {
    global: Option<Fault>,
    by_recipient: Vec<(String, Fault)>,
}

struct Shared {
    accepted: Mutex<Vec<Accepted>>,
    accepted_count: watch::Sender<usize>,
    connections: AtomicUsize,
    faults: Mutex<Faults>,
    reply_delay_nanos: AtomicU64,
    commands: Mutex<Vec<String>>,
    auth_users: Mutex<Vec<String>>,
    /// Extensions the EHLO reply names besides the defaults (e.g. PIPELINING).
    extra_extensions: Mutex<Vec<String>>,
    /// The AUTH mechanisms the EHLO reply names.
    auth_mechanisms: Mutex<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not make every later call panic too.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn global_fault(&self) -> Fault {
        lock(&self.faults).global.clone().unwrap_or(Fault::None)
    }

    fn recipient_fault(&self, address: &str) -> Option<Fault> {
        let faults = lock(&self.faults);
        faults
            .by_recipient
            .iter()
            .find(|(needle, _)| address.contains(needle.as_str()))
            .map(|(_, f)| f.clone())
    }

    fn reply_delay(&self) -> Duration {
        Duration::from_nanos(self.reply_delay_nanos.load(Ordering::Relaxed))
    }

    fn record(&self, accepted: Accepted) -> usize {
        let mut all = lock(&self.accepted);
        all.push(accepted);
        let n = all.len();
        self.accepted_count.send_replace(n);
        n
    }

    fn log_command(&self, line: &str) {
        lock(&self.commands).push(line.to_owned());
    }
}

/// A loopback SMTP server for tests. Stops (closing its listener and every connection) when
/// dropped.
pub struct SmtpPeer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        // Dropping the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

impl std::fmt::Debug for SmtpPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpPeer")
            .field("addr", &self.addr)
            .field("connections", &self.connections())
            .field("accepted", &lock(&self.shared.accepted).len())
            .finish()
    }
}

impl SmtpPeer {
    /// Starts a peer on 127.0.0.1 with a port chosen by the system.
    pub async fn start() -> SmtpPeer {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .expect("bind an SMTP peer on 127.0.0.1:0")
    }

    /// Starts a peer on `addr`, e.g. the address of a peer that was just dropped. Retries for a
    /// few seconds while the port is still in use (a dropped peer's listener closes when its
    /// aborted task is next polled).
    pub async fn start_on(addr: SocketAddr) -> io::Result<SmtpPeer> {
        let listener = bind(addr).await?;
        let addr = listener.local_addr()?;
        let (accepted_count, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            accepted: Mutex::new(Vec::new()),
            accepted_count,
            connections: AtomicUsize::new(0),
            faults: Mutex::new(Faults::default()),
            reply_delay_nanos: AtomicU64::new(0),
            commands: Mutex::new(Vec::new()),
            auth_users: Mutex::new(Vec::new()),
            extra_extensions: Mutex::new(Vec::new()),
            auth_mechanisms: Mutex::new("PLAIN LOGIN".into()),
        });
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(SmtpPeer { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every message the peer answered 2xx to after the final dot (or took with
    /// [`Fault::AcceptThenHangUp`]), in the order it took them.
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.shared.accepted).clone()
    }

    /// How many messages were accepted so far (cheaper than `accepted().len()`).
    pub fn accepted_count(&self) -> usize {
        lock(&self.shared.accepted).len()
    }

    /// The Message-IDs (without angle brackets) of the accepted messages that had one, in order.
    pub fn accepted_message_ids(&self) -> Vec<String> {
        lock(&self.shared.accepted)
            .iter()
            .filter_map(|a| a.message_id.clone())
            .collect()
    }

    /// Connections opened so far (including ones a fault dropped at once).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every command line received, in arrival order across all connections (AUTH payloads are
    /// left out; the message content is not a command).
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.commands).clone()
    }

    /// The user names clients authenticated as, in order.
    pub fn auth_users(&self) -> Vec<String> {
        lock(&self.shared.auth_users).clone()
    }

    /// The fault for every new connection or transaction from now on.
    pub fn set_fault(&self, fault: Fault) {
        lock(&self.shared.faults).global = Some(fault);
    }

    /// A fault for RCPT addresses containing `needle`; it takes precedence over `set_fault`. The
    /// first registered needle that matches wins. It acts at the RCPT that matched:
    /// - `Reply`/`HangUp` at `Mail` or `Rcpt`: replied to (or hung up on) that RCPT only, so a
    ///   `Reply { at: Stage::Rcpt, code: 550, .. }` rejects just that recipient;
    /// - `DropOnConnect` hangs up and `Greeting421` replies 421 and closes, at that RCPT;
    /// - later faults (`Data`, `AfterDot`, `SilentAfterDot`, `AcceptThenHangUp`) and `None`
    ///   replace the transaction's fault for the rest of that transaction.
    pub fn fault_for_recipient(&self, needle: &str, fault: Fault) {
        lock(&self.shared.faults)
            .by_recipient
            .push((needle.to_owned(), fault));
    }

    /// Removes the global fault and every recipient fault.
    pub fn clear_faults(&self) {
        *lock(&self.shared.faults) = Faults::default();
    }

    /// Waits until at least `n` messages were accepted; false if `timeout` passed first.
    pub async fn wait_for_accepted(&self, n: usize, timeout: Duration) -> bool {
        let mut rx = self.shared.accepted_count.subscribe();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|&count| count >= n)).await,
            Ok(Ok(_))
        )
    }

    /// Delays every reply (the greeting included) by `d`; zero turns it off.
    /// Offers ESMTP PIPELINING (RFC 2920) in EHLO replies from now on. The peer reads one
    /// command line at a time either way, so pipelined commands are answered in order.
    pub fn set_pipelining(&self, on: bool) {
        let mut extra = lock(&self.shared.extra_extensions);
        extra.retain(|e| e != "PIPELINING");
        if on {
            extra.push("PIPELINING".into());
        }
    }

    /// The AUTH mechanisms EHLO replies name from now on (`"PLAIN LOGIN"` at start).
    pub fn set_auth_mechanisms(&self, mechanisms: &str) {
        *lock(&self.shared.auth_mechanisms) = mechanisms.into();
    }

    pub fn set_reply_delay(&self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.shared
            .reply_delay_nanos
            .store(nanos, Ordering::Relaxed);
    }
}

async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let deadline = Instant::now() + REBIND_PATIENCE;
    loop {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        let result = socket.bind(addr).and_then(|()| socket.listen(1024));
        match result {
            Ok(listener) => return Ok(listener),
            Err(e)
                if e.kind() == io::ErrorKind::AddrInUse
                    && addr.port() != 0
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut tasks = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // EMFILE and the like: wait a little rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        while tasks.try_join_next().is_some() {}
        let id = shared.connections.fetch_add(1, Ordering::SeqCst);
        let fault = shared.global_fault();
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            match fault {
                Fault::DropOnConnect => drop(stream),
                fault => {
                    // Any I/O error ends the conversation, which is all it can do.
                    let _ = Conn::new(id, shared, stream).run(fault).await;
                }
            }
        });
    }
}

enum Flow {
    Continue,
    Close,
}

enum Line {
    Eof,
    TooLong,
    Text(String),
}

struct Txn {
    mail_from: String,
    rcpt_to: Vec<String>,
    fault: Fault,
}

struct Conn {
    id: usize,
    shared: Arc<Shared>,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    greeted: bool,
    auth_user: Option<String>,
    txn: Option<Txn>,
    buf: Vec<u8>,
}

impl Conn {
    fn new(id: usize, shared: Arc<Shared>, stream: TcpStream) -> Conn {
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Conn {
            id,
            shared,
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: w,
            greeted: false,
            auth_user: None,
            txn: None,
            buf: Vec::with_capacity(256),
        }
    }

    async fn run(mut self, fault: Fault) -> io::Result<()> {
        if fault == Fault::Greeting421 {
            self.reply(421, "4.3.2 Service not available").await?;
            return Ok(());
        }
        self.reply(220, "localhost ESMTP touchpoint test peer")
            .await?;
        loop {
            let line = match self.read_command().await? {
                Line::Eof => return Ok(()),
                Line::TooLong => {
                    self.reply(500, "5.5.2 Line too long").await?;
                    continue;
                }
                Line::Text(line) => line,
            };
            if let Flow::Close = self.command(&line).await? {
                return Ok(());
            }
        }
    }

    /// Writes a reply (one line per `\n` in `text`) after the configured delay. 421 closes.
    async fn reply(&mut self, code: u16, text: &str) -> io::Result<Flow> {
        let delay = self.shared.reply_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut out = String::with_capacity(text.len() + 8);
        let mut lines = text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            out.push_str(&format!("{code}{sep}{}\r\n", line.trim_end_matches('\r')));
        }
        self.writer.write_all(out.as_bytes()).await?;
        Ok(if code == 421 {
            Flow::Close
        } else {
            Flow::Continue
        })
    }

    async fn read_command(&mut self) -> io::Result<Line> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let got = read_line_into(&mut self.reader, &mut buf, MAX_COMMAND_LINE).await;
        let line = match got {
            Ok(ReadLine::Line) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                Ok(Line::Text(String::from_utf8_lossy(&buf).into_owned()))
            }
            Ok(ReadLine::TooLong) => Ok(Line::TooLong),
            Ok(ReadLine::Eof) => Ok(Line::Eof),
            Err(e) => Err(e),
        };
        self.buf = buf;
        line
    }

    async fn command(&mut self, line: &str) -> io::Result<Flow> {
        let (verb, arg) = match line.find([' ', '\t']) {
            Some(i) => (&line[..i], line[i + 1..].trim()),
            None => (line, ""),
        };
        let verb = verb.to_ascii_uppercase();
        if verb == "AUTH" {
            let mech = arg.split_whitespace().next().unwrap_or("");
            self.shared.log_command(&format!("AUTH {mech}"));
        } else {
            self.shared.log_command(line);
        }
        match verb.as_str() {
            "EHLO" | "HELO" if arg.is_empty() => {
                self.reply(501, &format!("5.5.4 Syntax: {verb} hostname"))
                    .await
            }
            "EHLO" => {
                self.greeted = true;
                self.txn = None;
                let auth = lock(&self.shared.auth_mechanisms).clone();
                let mut text = format!("localhost\n8BITMIME\nSMTPUTF8\nAUTH {auth}\nSIZE 52428800");
                for extension in lock(&self.shared.extra_extensions).iter() {
                    text.push('\n');
                    text.push_str(extension);
                }
                self.reply(250, &text).await
            }
            "HELO" => {
                self.greeted = true;
                self.txn = None;
                self.reply(250, "localhost").await
            }
            "AUTH" => self.auth(arg).await,
            "MAIL" => self.mail(arg).await,
            "RCPT" => self.rcpt(arg).await,
            "DATA" => self.data().await,
            "RSET" => {
                self.txn = None;
                self.reply(250, "2.0.0 Ok").await
            }
            "NOOP" => self.reply(250, "2.0.0 Ok").await,
            "QUIT" => {
                self.reply(221, "2.0.0 Bye").await?;
                Ok(Flow::Close)
            }
            _ => self.reply(502, "5.5.2 Command not recognized").await,
        }
    }

    async fn auth(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.greeted {
            return self.reply(503, "5.5.1 Send EHLO first").await;
        }
        if self.auth_user.is_some() {
            return self.reply(503, "5.5.1 Already authenticated").await;
        }
        if self.txn.is_some() {
            return self
                .reply(503, "5.5.1 AUTH not allowed during a transaction")
                .await;
        }
        let mut words = arg.split_whitespace();
        let mech = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next().map(str::to_owned);
        let user = match mech.as_str() {
            "PLAIN" => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge("").await? {
                        Some(r) => r,
                        None => return Ok(Flow::Close),
                    },
                };
                let plain = (response != "*")
                    .then(|| base64_decode(&response))
                    .flatten();
                // authzid NUL authcid NUL passwd
                let parts: Option<Vec<Vec<u8>>> =
                    plain.map(|p| p.split(|&b| b == 0).map(<[u8]>::to_vec).collect());
                match parts {
                    Some(parts) if parts.len() == 3 => {
                        String::from_utf8_lossy(&parts[1]).into_owned()
                    }
                    _ => {
                        return self
                            .reply(501, "5.5.2 Cannot decode AUTH PLAIN response")
                            .await;
                    }
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => r,
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Some(r) => r,
                        None => return Ok(Flow::Close),
                    },
                };
                let password = match self.challenge("UGFzc3dvcmQ6").await? {
                    Some(r) => r,
                    None => return Ok(Flow::Close),
                };
                match (base64_decode(&user), base64_decode(&password)) {
                    (Some(user), Some(_)) if user != b"*" => {
                        String::from_utf8_lossy(&user).into_owned()
                    }
                    _ => {
                        return self
                            .reply(501, "5.5.2 Cannot decode AUTH LOGIN response")
                            .await;
                    }
                }
            }
            _ => {
                return self
                    .reply(504, "5.5.4 Unrecognized authentication type")
                    .await;
            }
        };
        lock(&self.shared.auth_users).push(user.clone());
        self.auth_user = Some(user);
        self.reply(235, "2.7.0 Authentication successful").await
    }

    /// Sends a 334 challenge and reads the client's answer line; None at end of stream.
    async fn challenge(&mut self, text: &str) -> io::Result<Option<String>> {
        if let Flow::Close = self.reply(334, text).await? {
            return Ok(None);
        }
        match self.read_command().await? {
            Line::Text(t) => Ok(Some(t)),
            Line::TooLong => Ok(Some(String::new())),
            Line::Eof => Ok(None),
        }
    }

    async fn mail(&mut self, arg: &str) -> io::Result<Flow> {
        if !self.greeted {
            return self.reply(503, "5.5.1 Send EHLO first").await;
        }
        if self.txn.is_some() {
            return self.reply(503, "5.5.1 Nested MAIL command").await;
        }
        let Some(mail_from) = strip_prefix_ci(arg, "FROM:").and_then(parse_path) else {
            return self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>").await;
        };
        let fault = self.shared.global_fault();
        let action = stage_action(&fault, Stage::Mail);
        let txn = Txn {
            mail_from,
            rcpt_to: Vec::new(),
            fault,
        };
        match action {
            Action::HangUp => Ok(Flow::Close),
            Action::Reply(code, text) => {
                if is_positive(code) {
                    self.txn = Some(txn);
                }
                self.reply(code, &text).await
            }
            Action::Normal => {
                self.txn = Some(txn);
                self.reply(250, "2.1.0 Ok").await
            }
        }
    }

    async fn rcpt(&mut self, arg: &str) -> io::Result<Flow> {
        let Some(txn) = self.txn.as_mut() else {
            return self.reply(503, "5.5.1 Need MAIL command").await;
        };
        let Some(address) = strip_prefix_ci(arg, "TO:").and_then(parse_path) else {
            return self.reply(501, "5.5.4 Syntax: RCPT TO:<address>").await;
        };
        if address.is_empty() {
            return self.reply(501, "5.1.3 Bad recipient address syntax").await;
        }
        if txn.rcpt_to.len() >= MAX_RECIPIENTS {
            return self.reply(452, "4.5.3 Too many recipients").await;
        }
        let action = match self.shared.recipient_fault(&address) {
            Some(fault) => match fault {
                Fault::DropOnConnect
                | Fault::HangUp {
                    at: Stage::Mail | Stage::Rcpt,
                } => Action::HangUp,
                Fault::Greeting421 => Action::Reply(421, "4.3.2 Service not available".into()),
                Fault::Reply {
                    at: Stage::Mail | Stage::Rcpt,
                    code,
                    text,
                } => Action::Reply(code, text),
                later => {
                    txn.fault = later;
                    Action::Normal
                }
            },
            None => stage_action(&txn.fault, Stage::Rcpt),
        };
        match action {
            Action::HangUp => Ok(Flow::Close),
            Action::Reply(code, text) => {
                if is_positive(code) {
                    txn.rcpt_to.push(address);
                }
                self.reply(code, &text).await
            }
            Action::Normal => {
                txn.rcpt_to.push(address);
                self.reply(250, "2.1.5 Ok").await
            }
        }
    }

    async fn data(&mut self) -> io::Result<Flow> {
        let action = match &self.txn {
            None => return self.reply(503, "5.5.1 Need MAIL command").await,
            Some(txn) if txn.rcpt_to.is_empty() => {
                return self.reply(554, "5.5.1 No valid recipients").await;
            }
            Some(txn) => stage_action(&txn.fault, Stage::Data),
        };
        match action {
            Action::HangUp => return Ok(Flow::Close),
            Action::Reply(code, text) if code != 354 => {
                self.txn = None;
                return self.reply(code, &text).await;
            }
            Action::Reply(code, text) => {
                self.reply(code, &text).await?;
            }
            Action::Normal => {
                self.reply(354, "End data with <CR><LF>.<CR><LF>").await?;
            }
        }
        let Some((data, too_big)) = self.read_data().await? else {
            return Ok(Flow::Close);
        };
        let txn = self.txn.take().expect("a transaction is under way");
        if too_big {
            return self
                .reply(552, "5.3.4 Message size exceeds fixed limit")
                .await;
        }
        let accept = |data: Vec<u8>| Accepted {
            message_id: message_id(&data),
            mail_from: txn.mail_from.clone(),
            rcpt_to: txn.rcpt_to.clone(),
            data,
            accepted_at: Instant::now(),
            connection: self.id,
            auth_user: self.auth_user.clone(),
        };
        match &txn.fault {
            Fault::HangUp {
                at: Stage::AfterDot,
            } => Ok(Flow::Close),
            Fault::SilentAfterDot => {
                let mut sink = vec![0u8; 8192];
                while self.reader.read(&mut sink).await? > 0 {}
                Ok(Flow::Close)
            }
            Fault::AcceptThenHangUp => {
                self.shared.record(accept(data));
                Ok(Flow::Close)
            }
            Fault::Reply {
                at: Stage::AfterDot,
                code,
                text,
            } => {
                if is_positive(*code) {
                    self.shared.record(accept(data));
                }
                self.reply(*code, text).await
            }
            _ => {
                let n = self.shared.record(accept(data));
                self.reply(250, &format!("2.0.0 Ok: queued as {n}")).await
            }
        }
    }

    /// Reads the message up to the final dot, dot-unstuffed. None if the stream ended first;
    /// the flag says it was larger than [`MAX_MESSAGE_SIZE`] (and was not kept).
    async fn read_data(&mut self) -> io::Result<Option<(Vec<u8>, bool)>> {
        let mut data = Vec::with_capacity(16 * 1024);
        let mut too_big = false;
        loop {
            let start = data.len();
            let budget = (MAX_MESSAGE_SIZE + 3).saturating_sub(start).max(3);
            match read_line_into(&mut self.reader, &mut data, budget).await? {
                ReadLine::Eof => return Ok(None),
                ReadLine::TooLong => {
                    too_big = true;
                    data.clear();
                }
                ReadLine::Line => {
                    let line = &data[start..];
                    if line == b".\r\n" || line == b".\n" {
                        data.truncate(start);
                        return Ok(Some((data, too_big)));
                    }
                    if line[0] == b'.' {
                        data.remove(start);
                    }
                    if data.len() > MAX_MESSAGE_SIZE {
                        too_big = true;
                        data.clear();
                    }
                }
            }
        }
    }
}

enum ReadLine {
    Eof,
    TooLong,
    Line,
}

/// Appends one line (through its LF) to `out`. A line longer than `max` is consumed and
/// dropped (TooLong). A partial line at end of stream counts as end of stream.
async fn read_line_into(
    reader: &mut BufReader<OwnedReadHalf>,
    out: &mut Vec<u8>,
    max: usize,
) -> io::Result<ReadLine> {
    let start = out.len();
    let mut discarding = false;
    loop {
        let refill = reader.buffer().is_empty();
        if reader.fill_buf().await?.is_empty() {
            out.truncate(start);
            return Ok(ReadLine::Eof);
        }
        if refill {
            quick_ack(reader.get_ref());
        }
        let available = reader.buffer();
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !discarding {
            if out.len() - start + take > max {
                out.truncate(start);
                discarding = true;
            } else {
                out.extend_from_slice(&available[..take]);
            }
        }
        reader.consume(take);
        if done {
            return Ok(if discarding {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
    }
}

/// Acknowledges what was just read at once. lettre does not set TCP_NODELAY and writes the body
/// and the final "\r\n.\r\n" separately, so without this every message on a reused connection
/// waits for Linux's delayed ACK (about 40 ms) before the dot leaves the client.
fn quick_ack(stream: &OwnedReadHalf) {
    #[cfg(target_os = "linux")]
    let _ = AsRef::<TcpStream>::as_ref(stream).set_quickack(true);
    #[cfg(not(target_os = "linux"))]
    let _ = stream;
}

fn is_positive(code: u16) -> bool {
    (200..300).contains(&code)
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| s[prefix.len()..].trim_start())
}

/// `<address> [params]` (or a bare address) to the address without brackets.
fn parse_path(s: &str) -> Option<String> {
    if let Some(rest) = s.strip_prefix('<') {
        let end = rest.find('>')?;
        Some(rest[..end].to_owned())
    } else {
        let address = s.split_whitespace().next()?;
        Some(address.to_owned())
    }
}

/// The Message-ID header's value (header names are case-insensitive, values may be folded),
/// without angle brackets.
pub fn message_id(data: &[u8]) -> Option<String> {
    let mut current: Option<Vec<u8>> = None;
    let mut found = None;
    let mut lines = data.split(|&b| b == b'\n');
    loop {
        let line = lines.next().map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let continues = matches!(line, Some([b' ' | b'\t', ..]));
        if continues {
            if let (Some(header), Some(line)) = (current.as_mut(), line) {
                header.extend_from_slice(line);
            }
            continue;
        }
        if let Some(header) = current.take()
            && let Some(value) = header_value(&header, "message-id")
        {
            found = Some(value);
        }
        match line {
            None | Some([]) => break,
            Some(line) => current = Some(line.to_vec()),
        }
    }
    let value = found?;
    let value = value.trim();
    let id = match (value.find('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        _ => value,
    };
    Some(id.trim().to_owned()).filter(|id| !id.is_empty())
}

fn header_value(header: &[u8], name: &str) -> Option<String> {
    let colon = header.iter().position(|&b| b == b':')?;
    let field = std::str::from_utf8(&header[..colon]).ok()?;
    field
        .trim_end()
        .eq_ignore_ascii_case(name)
        .then(|| String::from_utf8_lossy(&header[colon + 1..]).into_owned())
}

/// Standard base64 (padding optional, whitespace ignored); None if malformed.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect::<Vec<_>>();
    let trimmed = digits
        .iter()
        .rposition(|&b| b != b'=')
        .map_or(&digits[..0], |i| &digits[..=i]);
    if digits.len() - trimmed.len() > 2 || trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}
