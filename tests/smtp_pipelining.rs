//! The SMTP transport's own client, against real servers over real sockets: Postfix's
//! `smtp-sink` (which offers PIPELINING, or not with `-p`), the test peer of `support::smtp`
//! with PIPELINING offered (its fault matrix), and a raw peer here that records every read it
//! makes, to show how the client's bytes arrive and to hang up where the others cannot.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::smtp::{Fault, SmtpPeer, Stage};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use touchpoint::transport::{OutgoingEmail, SendError, SmtpSettings, SmtpTransport, TlsMode};

const FROM: &str = "bounces+1.tag@acme.example";
const TO: &str = "ann@example.org";

fn settings(port: u16, timeout: Duration) -> SmtpSettings {
    SmtpSettings {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::None,
        username: None,
        password: None,
        pool_size: 4,
        timeout,
        helo_name: Some("touchpoint.test".into()),
    }
}

fn transport(port: u16) -> SmtpTransport {
    SmtpTransport::new(settings(port, Duration::from_secs(5)))
}

fn email_with(to: &str, id: &str, body: &str) -> OutgoingEmail {
    let bytes = format!(
        "From: Acme <hello@acme.example>\r\nTo: {to}\r\nSubject: Thank you\r\nMessage-ID: <{id}>\r\n\r\n{body}"
    );
    OutgoingEmail {
        envelope_from: FROM.parse().unwrap(),
        to: to.parse().unwrap(),
        message_id: format!("<{id}>"),
        bytes: bytes.into_bytes(),
    }
}

fn email(id: &str) -> OutgoingEmail {
    email_with(TO, id, "Hello,\r\nthank you.\r\n")
}

async fn send(t: &SmtpTransport, email: &OutgoingEmail) -> Result<String, SendError> {
    tokio::time::timeout(Duration::from_secs(30), t.deliver(email, || async { true }))
        .await
        .expect("the transport answers within 30 s")
}

// --- Postfix's smtp-sink -------------------------------------------------------------------

/// `smtp-sink -c` on a free loopback port, its running counters in a file.
struct SmtpSink {
    child: Child,
    port: u16,
    counters: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmtpSink {
    fn start(extra: &[&str]) -> SmtpSink {
        let sink = "/usr/sbin/smtp-sink";
        assert!(
            std::path::Path::new(sink).exists(),
            "{sink} is missing: apt-get install postfix"
        );
        let dir = tempfile::tempdir().unwrap();
        let counters = dir.path().join("counters");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = Command::new(sink);
        command.arg("-c").args(extra);
        if is_root() {
            // smtp-sink refuses to run as root without being told which user to be.
            command.args(["-u", "root"]);
        }
        let child = command
            .arg(format!("127.0.0.1:{port}"))
            .arg("100")
            .stdout(std::fs::File::create(&counters).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        SmtpSink {
            child,
            port,
            counters,
            _dir: dir,
        }
    }

    /// The last `mesg=N` counter: messages whose final dot smtp-sink answered.
    fn messages(&self) -> u64 {
        let text = std::fs::read_to_string(&self.counters).unwrap_or_default();
        text.rsplit("mesg=")
            .next()
            .and_then(|tail| {
                let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            })
            .unwrap_or(0)
    }

    async fn wait_for_messages(&self, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.messages() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.messages()
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1).map(|uid| uid == "0"))
        .unwrap_or(false)
}

/// `messages` messages over the transport's four connections at once.
async fn send_many(t: Arc<SmtpTransport>, messages: usize) -> usize {
    let mut senders = JoinSet::new();
    for worker in 0..4 {
        let t = Arc::clone(&t);
        senders.spawn(async move {
            let mut sent = 0;
            for n in (worker..messages).step_by(4) {
                let reply = send(&t, &email(&format!("{n}@sink"))).await.unwrap();
                assert!(reply.starts_with("250"), "{reply}");
                sent += 1;
            }
            sent
        });
    }
    senders.join_all().await.into_iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_sink_takes_every_message_with_and_without_pipelining() {
    // With two connections for four senders, messages wait in line and go out after another
    // message's final dot (with PIPELINING) or on the connection it frees (without).
    for (extra, pool_size) in [
        (&[][..], 4),
        (&["-p"][..], 4),
        (&[][..], 2),
        (&["-p"][..], 2),
    ] {
        let sink = SmtpSink::start(extra);
        let t = Arc::new(SmtpTransport::new(SmtpSettings {
            pool_size,
            ..settings(sink.port, Duration::from_secs(5))
        }));
        assert_eq!(send_many(Arc::clone(&t), 400).await, 400);
        t.close().await;
        sink.wait_for_messages(400).await;
        // Let anything sent twice arrive too before counting.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sink.messages(),
            400,
            "smtp-sink {extra:?}, {pool_size} connections"
        );
    }
}

// --- the test peer's fault matrix, with PIPELINING offered ---------------------------------

async fn pipelining_peer() -> SmtpPeer {
    let peer = SmtpPeer::start().await;
    peer.set_pipelining(true);
    peer
}

async fn failure_with(fault: Fault) -> (SendError, SmtpPeer) {
    let peer = pipelining_peer().await;
    peer.set_fault(fault);
    let t = SmtpTransport::new(settings(peer.port(), Duration::from_secs(1)));
    let error = send(&t, &email("fault@id")).await.unwrap_err();
    (error, peer)
}

#[tokio::test]
async fn pipelined_refusals_are_attributed_to_their_command() {
    let reply = |at, code, text: &str| Fault::Reply {
        at,
        code,
        text: text.into(),
    };
    let cases = [
        (
            reply(Stage::Mail, 451, "4.3.0 Try later"),
            "451 4.3.0 Try later",
        ),
        (reply(Stage::Mail, 421, "4.3.2 Bye"), "421 4.3.2 Bye"),
        (
            reply(Stage::Rcpt, 550, "5.1.1 No such user"),
            "550 5.1.1 No such user",
        ),
        (reply(Stage::Rcpt, 452, "4.5.3 Later"), "452 4.5.3 Later"),
        (
            reply(Stage::Data, 554, "5.6.0 No thanks"),
            "554 5.6.0 No thanks",
        ),
        (reply(Stage::AfterDot, 452, "4.3.1 Full"), "452 4.3.1 Full"),
        (reply(Stage::AfterDot, 550, "5.7.1 Spam"), "550 5.7.1 Spam"),
    ];
    for (fault, text) in cases {
        let (error, peer) = failure_with(fault.clone()).await;
        let expected = match &fault {
            Fault::Reply { code: 421, .. } => SendError::RelayUnavailable(text.into()),
            Fault::Reply { code: 400..500, .. } => SendError::Transient(text.into()),
            Fault::Reply { at, .. } => SendError::Permanent {
                reply: text.into(),
                bad_address: *at == Stage::Rcpt,
            },
            _ => unreachable!(),
        };
        assert_eq!(error, expected, "{fault:?}");
        assert_eq!(peer.accepted_count(), 0, "{fault:?}");
        if matches!(
            fault,
            Fault::Reply {
                at: Stage::Rcpt,
                ..
            }
        ) {
            // DATA went out with MAIL and RCPT and was refused (no valid recipients); the
            // answer is the RCPT refusal, not DATA's 554.
            let commands = peer.commands();
            assert!(commands.iter().any(|c| c == "DATA"), "{commands:?}");
        }
    }
}

#[tokio::test]
async fn pipelined_hang_ups_before_the_body_are_transient_and_after_it_ambiguous() {
    let cases = [
        (Fault::HangUp { at: Stage::Mail }, false),
        (Fault::HangUp { at: Stage::Rcpt }, false),
        (Fault::HangUp { at: Stage::Data }, false),
        (
            Fault::HangUp {
                at: Stage::AfterDot,
            },
            true,
        ),
        (Fault::AcceptThenHangUp, true),
        (Fault::SilentAfterDot, true),
    ];
    for (fault, after_body) in cases {
        let (error, peer) = failure_with(fault.clone()).await;
        match error {
            SendError::Transient(why) if !after_body => {
                assert!(why.contains("connection lost before the body"), "{why}")
            }
            SendError::Ambiguous(why) if after_body => assert!(
                why.contains("incomplete response") || why.contains("did not answer within 1s"),
                "{fault:?}: {why}"
            ),
            other => panic!("{fault:?}: {other:?}"),
        }
        let accepted = usize::from(fault == Fault::AcceptThenHangUp);
        assert_eq!(peer.accepted_count(), accepted, "{fault:?}");
    }
}

#[tokio::test]
async fn an_unusable_relay_is_unavailable() {
    for fault in [Fault::Greeting421, Fault::DropOnConnect] {
        let (error, _peer) = failure_with(fault.clone()).await;
        let SendError::RelayUnavailable(why) = error else {
            panic!("{fault:?}: {error:?}");
        };
        if fault == Fault::Greeting421 {
            assert!(why.contains("421 4.3.2 Service not available"), "{why}");
        }
    }
}

#[tokio::test]
async fn a_connection_carries_many_messages_without_rset_or_noop() {
    let peer = pipelining_peer().await;
    let t = transport(peer.port());
    for n in 0..5 {
        send(&t, &email(&format!("{n}@reuse"))).await.unwrap();
    }
    t.close().await;
    assert_eq!(peer.accepted_count(), 5);
    assert_eq!(peer.connections(), 1);
    let verbs: Vec<String> = peer
        .commands()
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap().to_owned())
        .collect();
    let mut expected = vec!["EHLO"];
    for _ in 0..5 {
        expected.extend(["MAIL", "RCPT", "DATA"]);
    }
    expected.push("QUIT");
    assert_eq!(verbs, expected);
    let accepted = peer.accepted();
    assert_eq!(accepted[0].mail_from, FROM, "the VERP envelope sender");
    assert_eq!(accepted[0].rcpt_to, [TO]);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced_without_failing_the_message() {
    let peer = pipelining_peer().await;
    let addr = peer.addr();
    let t = transport(peer.port());
    send(&t, &email("1@stale")).await.unwrap();
    // The server goes away and comes back: the pooled connection is dead.
    drop(peer);
    let peer = SmtpPeer::start_on(addr).await.unwrap();
    peer.set_pipelining(true);
    send(&t, &email("2@stale")).await.unwrap();
    assert_eq!(peer.accepted_message_ids(), ["2@stale"]);
}

#[tokio::test]
async fn auth_plain_and_login_are_used_when_configured() {
    let peer = pipelining_peer().await;
    for (mechanisms, user) in [("PLAIN LOGIN", "alice"), ("LOGIN", "bob")] {
        peer.set_auth_mechanisms(mechanisms);
        let mut s = settings(peer.port(), Duration::from_secs(5));
        s.username = Some(user.into());
        s.password = Some(touchpoint::settings::Secret("secret".into()));
        let t = SmtpTransport::new(s);
        send(&t, &email(&format!("{user}@auth"))).await.unwrap();
    }
    assert_eq!(peer.auth_users(), ["alice", "bob"]);
    let mechanisms: Vec<String> = peer
        .commands()
        .into_iter()
        .filter(|c| c.starts_with("AUTH"))
        .collect();
    assert_eq!(mechanisms, ["AUTH PLAIN", "AUTH LOGIN"]);
}

#[tokio::test]
async fn dot_stuffing_round_trips() {
    let peer = pipelining_peer().await;
    let t = transport(peer.port());
    let body = ".hidden\r\n..two\r\n.\r\n. \r\nend.\r\n";
    let sent = email_with(TO, "dots@id", body);
    send(&t, &sent).await.unwrap();
    // Bare line feeds go out as CRLF, and a last line without an ending gets one.
    send(&t, &email_with(TO, "lf@id", "a\n.b\nlast"))
        .await
        .unwrap();
    let accepted = peer.accepted();
    assert_eq!(
        accepted[0].data, sent.bytes,
        "the message arrives byte for byte"
    );
    let text = String::from_utf8(accepted[1].data.clone()).unwrap();
    assert!(text.ends_with("\r\n\r\na\r\n.b\r\nlast\r\n"), "{text:?}");
}

// --- a raw peer that records how the bytes arrive ------------------------------------------

/// What the raw peer does once it has answered DATA with 354.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterData {
    /// Read the message up to the final dot and accept it.
    Accept,
    /// Close the connection at once: not a byte of the body read.
    HangUp,
    /// Read the first bytes of the body, then close.
    HangUpMidBody,
}

struct RawPeer {
    addr: SocketAddr,
    /// Every read, as it arrived, over all connections.
    reads: Arc<Mutex<Vec<Vec<u8>>>>,
    task: JoinHandle<()>,
}

impl Drop for RawPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawPeer {
    async fn start(pipelining: bool, after: AfterData) -> RawPeer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reads = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&reads);
        let task = tokio::spawn(async move {
            let mut conversations = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let reads = Arc::clone(&recorded);
                conversations.spawn(async move {
                    let mut conversation = Conversation {
                        stream,
                        pending: Vec::new(),
                        reads,
                    };
                    let _ = conversation.run(pipelining, after).await;
                });
            }
        });
        RawPeer { addr, reads, task }
    }

    fn reads(&self) -> Vec<Vec<u8>> {
        self.reads.lock().unwrap().clone()
    }

    fn received(&self) -> Vec<u8> {
        self.reads().concat()
    }
}

struct Conversation {
    stream: TcpStream,
    pending: Vec<u8>,
    reads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Conversation {
    async fn run(&mut self, pipelining: bool, after: AfterData) -> std::io::Result<()> {
        self.stream.set_nodelay(true)?;
        self.say("220 raw peer ESMTP\r\n").await?;
        while let Some(line) = self.line().await? {
            let verb = line
                .split([' ', ':'])
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" if pipelining => self.say("250-raw\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
                "EHLO" => self.say("250-raw\r\n250 8BITMIME\r\n"),
                "MAIL" | "RCPT" | "RSET" | "NOOP" => self.say("250 2.0.0 Ok\r\n"),
                "QUIT" => return self.say("221 2.0.0 Bye\r\n").await,
                "DATA" => {
                    self.say("354 Go ahead\r\n").await?;
                    match after {
                        AfterData::HangUp => return Ok(()),
                        AfterData::HangUpMidBody => {
                            self.read_more().await?;
                            return Ok(());
                        }
                        AfterData::Accept => {
                            self.message().await?;
                            self.say("250 2.0.0 Ok: queued\r\n")
                        }
                    }
                }
                _ => self.say("502 5.5.2 What?\r\n"),
            }
            .await?;
        }
        Ok(())
    }

    async fn say(&mut self, reply: &str) -> std::io::Result<()> {
        self.stream.write_all(reply.as_bytes()).await
    }

    /// Reads once, recording what arrived; false at end of stream.
    async fn read_more(&mut self) -> std::io::Result<bool> {
        let mut chunk = vec![0u8; 64 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        chunk.truncate(n);
        self.reads.lock().unwrap().push(chunk.clone());
        self.pending.extend_from_slice(&chunk);
        Ok(n > 0)
    }

    async fn line(&mut self) -> std::io::Result<Option<String>> {
        loop {
            if let Some(end) = self.pending.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.pending.drain(..end + 2).collect();
                return Ok(Some(String::from_utf8_lossy(&line[..end]).into_owned()));
            }
            if !self.read_more().await? {
                return Ok(None);
            }
        }
    }

    /// Consumes the message through the final dot.
    async fn message(&mut self) -> std::io::Result<()> {
        loop {
            let text = &self.pending;
            let end = if text.starts_with(b".\r\n") {
                Some(3)
            } else {
                text.windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|i| i + 5)
            };
            if let Some(end) = end {
                self.pending.drain(..end);
                return Ok(());
            }
            if !self.read_more().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

const ENVELOPE: &[u8] =
    b"MAIL FROM:<bounces+1.tag@acme.example>\r\nRCPT TO:<ann@example.org>\r\nDATA\r\n";

#[tokio::test]
async fn with_pipelining_the_envelope_arrives_in_one_read() {
    let peer = RawPeer::start(true, AfterData::Accept).await;
    let t = transport(peer.addr.port());
    for n in 0..3 {
        send(&t, &email(&format!("{n}@raw"))).await.unwrap();
    }
    let reads = peer.reads();
    let envelopes = reads.iter().filter(|r| r.as_slice() == ENVELOPE).count();
    assert_eq!(envelopes, 3, "{:#?}", printable(&reads));
    // The body and the final dot are one write too.
    let bodies = reads
        .iter()
        .filter(|r| r.starts_with(b"From: ") && r.ends_with(b"thank you.\r\n.\r\n"))
        .count();
    assert_eq!(bodies, 3, "{:#?}", printable(&reads));
}

#[tokio::test]
async fn without_pipelining_the_commands_arrive_one_by_one() {
    let peer = RawPeer::start(false, AfterData::Accept).await;
    let t = transport(peer.addr.port());
    send(&t, &email("1@raw")).await.unwrap();
    let reads = peer.reads();
    let mut lines = ENVELOPE.split_inclusive(|&b| b == b'\n');
    let expected: Vec<&[u8]> = lines.by_ref().collect();
    for command in &expected {
        assert!(
            reads.iter().any(|r| r.as_slice() == *command),
            "{command:?} not in its own read: {:#?}",
            printable(&reads)
        );
    }
}

fn printable(reads: &[Vec<u8>]) -> Vec<String> {
    reads
        .iter()
        .map(|r| String::from_utf8_lossy(r).into_owned())
        .collect()
}

#[tokio::test]
async fn the_body_waits_for_before_body_and_a_withdrawal_sends_none_of_it() {
    for pipelining in [true, false] {
        let peer = Arc::new(RawPeer::start(pipelining, AfterData::Accept).await);
        let t = transport(peer.addr.port());
        let seen = Arc::clone(&peer);
        let asked = AtomicBool::new(false);
        let result = t
            .deliver(&email("w@raw"), || async {
                asked.store(true, Ordering::SeqCst);
                // Time for any early body byte to arrive: none may.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let received = seen.received();
                assert!(received.ends_with(b"DATA\r\n"), "{received:?}");
                false
            })
            .await;
        assert!(asked.load(Ordering::SeqCst));
        assert_eq!(result, Err(SendError::Withdrawn));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            peer.received().ends_with(b"DATA\r\n"),
            "a body byte went out"
        );
    }
}

#[tokio::test]
async fn a_drop_after_354_before_the_body_is_not_ambiguous() {
    for pipelining in [true, false] {
        let peer = RawPeer::start(pipelining, AfterData::HangUp).await;
        let t = transport(peer.addr.port());
        let result = t
            .deliver(&email("gone@raw"), || async {
                // What the phase commit takes, at least: the peer's close has arrived by now.
                tokio::time::sleep(Duration::from_millis(100)).await;
                true
            })
            .await;
        match result {
            Err(SendError::Transient(why)) => {
                assert!(why.contains("before the body was sent"), "{why}")
            }
            other => panic!("pipelining {pipelining}: {other:?}"),
        }
        assert!(peer.received().ends_with(b"DATA\r\n"));
    }
}

#[tokio::test]
async fn a_drop_in_the_middle_of_the_body_is_ambiguous() {
    for pipelining in [true, false] {
        let peer = RawPeer::start(pipelining, AfterData::HangUpMidBody).await;
        let t = transport(peer.addr.port());
        // Large enough that the body is still going out when the peer hangs up.
        let body = "a line of the message body, one of many\r\n".repeat(50_000);
        let result = send(&t, &email_with(TO, "mid@raw", &body)).await;
        assert!(
            matches!(result, Err(SendError::Ambiguous(_))),
            "pipelining {pipelining}: {result:?}"
        );
    }
}

// --- TLS: implicit and STARTTLS, with the relay's certificate from a private CA --------------

/// A CA and a certificate for 127.0.0.1 that it signed, made by the openssl command.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn make() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let key = format!("{ca}.key");
            let pem = format!("{ca}.pem");
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend([
                "-keyout",
                &key,
                "-out",
                &pem,
                "-subj",
                "/CN=test ca",
                "-days",
                "2",
            ]);
            run(&args);
        }
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        run(&args);
        std::fs::write(
            dir.path().join("leaf.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ]);
        Certificates { dir }
    }

    fn der(&self, name: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_file(self.dir.path().join(name))
            .unwrap()
            .to_vec()
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = vec![CertificateDer::from_pem_file(self.dir.path().join("leaf.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(self.dir.path().join("leaf.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

/// TLS in front of the test peer: implicit (TLS from the first byte), or STARTTLS (greets and
/// answers EHLO and STARTTLS itself, then hands the encrypted session to the peer).
async fn tls_front(
    acceptor: tokio_rustls::TlsAcceptor,
    upstream: SocketAddr,
    starttls: bool,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut sessions = JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            sessions.spawn(async move {
                if starttls && starttls_preamble(&mut client).await.is_err() {
                    return;
                }
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let mut peer = TcpStream::connect(upstream).await.unwrap();
                if starttls {
                    // The client does not expect a second greeting after STARTTLS.
                    let mut greeting = [0u8; 512];
                    let _ = peer.read(&mut greeting).await;
                }
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut peer).await;
            });
        }
    });
    (addr, task)
}

async fn starttls_preamble(client: &mut TcpStream) -> std::io::Result<()> {
    client.write_all(b"220 front ESMTP\r\n").await?;
    let mut line = Vec::new();
    for reply in [
        &b"250-front\r\n250 STARTTLS\r\n"[..],
        b"220 2.0.0 Ready to start TLS\r\n",
    ] {
        line.clear();
        while !line.ends_with(b"\n") {
            let mut byte = [0u8; 1];
            if client.read(&mut byte).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            line.push(byte[0]);
        }
        client.write_all(reply).await?;
    }
    assert!(line.starts_with(b"STARTTLS"), "{line:?}");
    Ok(())
}

#[tokio::test]
async fn implicit_tls_and_starttls_carry_the_message_and_the_login() {
    let certificates = Certificates::make();
    let peer = pipelining_peer().await;
    for (tls, starttls) in [(TlsMode::Tls, false), (TlsMode::Starttls, true)] {
        let (front, _task) = tls_front(certificates.acceptor(), peer.addr(), starttls).await;
        let mut s = settings(front.port(), Duration::from_secs(5));
        s.tls = tls;
        s.username = Some(format!("{tls:?}"));
        s.password = Some(touchpoint::settings::Secret("secret".into()));
        let t = SmtpTransport::new(s.clone())
            .with_root_certificate(certificates.der("ca.pem"))
            .unwrap();
        for n in 0..3 {
            send(&t, &email(&format!("{n}.{tls:?}@tls"))).await.unwrap();
        }
        t.close().await;
        // Without the CA the relay's certificate is not trusted; nothing goes out.
        let untrusted = SmtpTransport::new(s.clone())
            .with_root_certificate(certificates.der("other-ca.pem"))
            .unwrap();
        match send(&untrusted, &email("no@tls")).await {
            Err(SendError::RelayUnavailable(why)) => assert!(why.contains("TLS"), "{why}"),
            other => panic!("{tls:?}: {other:?}"),
        }
    }
    assert_eq!(peer.accepted_count(), 6);
    assert_eq!(peer.auth_users(), ["Tls", "Starttls"]);
}

// --- the transport's own rate (a measurement, not a test: `--ignored --nocapture`) ---------

/// Messages per second through the transport alone to smtp-sink, with PIPELINING offered and
/// not (`-p`), over 4 and 8 connections, with one sender per connection and with two (as the
/// dispatcher runs, so that a message waits in line and its envelope can follow the previous
/// final dot): what the SMTP side can carry without the database.
/// Run: cargo test --release --test smtp_pipelining -- --ignored --nocapture transport_rate
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints numbers, asserts only that every message went out"]
async fn transport_rate_to_smtp_sink() {
    let messages = 20_000;
    for (connections, per_connection) in [(4, 1), (4, 2), (8, 1), (8, 2)] {
        for extra in [&[][..], &["-p"][..]] {
            let sink = SmtpSink::start(extra);
            let mut s = settings(sink.port, Duration::from_secs(5));
            s.pool_size = connections;
            let t = Arc::new(SmtpTransport::new(s));
            let started = Instant::now();
            let mut senders = JoinSet::new();
            let workers = connections * per_connection;
            for worker in 0..workers {
                let t = Arc::clone(&t);
                senders.spawn(async move {
                    let body = "x".repeat(76) + "\r\n";
                    let email = email_with(TO, "rate@sink", &body.repeat(50));
                    for _ in (worker..messages).step_by(workers) {
                        send(&t, &email).await.unwrap();
                    }
                });
            }
            senders.join_all().await;
            let rate = messages as f64 / started.elapsed().as_secs_f64();
            t.close().await;
            assert_eq!(
                sink.wait_for_messages(messages as u64).await,
                messages as u64
            );
            let pipelining = if extra.is_empty() {
                "offered"
            } else {
                "not offered (-p)"
            };
            println!(
                "connections {connections}, senders per connection {per_connection}, \
                 PIPELINING {pipelining}: {rate:.0} messages/s"
            );
        }
    }
}

// --- the next message's envelope after the final dot ----------------------------------------

/// A transport with one connection, so that messages sent together wait in line for it.
fn one_connection(port: u16) -> SmtpTransport {
    SmtpTransport::new(SmtpSettings {
        pool_size: 1,
        ..settings(port, Duration::from_secs(2))
    })
}

/// Sends three messages at once over `t` (the first takes the connection, the other two wait
/// in line before it reaches its body); the second is withdrawn at its body if `withdraw_second`.
async fn three_at_once(
    t: &SmtpTransport,
    emails: [&OutgoingEmail; 3],
    withdraw_second: bool,
) -> [Result<String, SendError>; 3] {
    let (first, second, third) = tokio::join!(
        within(t.deliver(emails[0], || async { true })),
        within(t.deliver(emails[1], || async move { !withdraw_second })),
        within(t.deliver(emails[2], || async { true })),
    );
    [first, second, third]
}

/// Three messages to ann@, bob@ and cid@example.org, with Message-IDs `a@tag`, `b@tag`, `c@tag`.
fn ann_bob_cid(tag: &str) -> [OutgoingEmail; 3] {
    ["ann", "bob", "cid"].map(|name| {
        let id = format!("{}@{tag}", &name[..1]);
        email_with(
            &format!("{name}@example.org"),
            &id,
            &format!("Hello {name}\r\n"),
        )
    })
}

async fn within<T>(send: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), send)
        .await
        .expect("the transport answers within 30 s")
}

fn accepted_ids(peer: &SmtpPeer) -> Vec<String> {
    let mut ids = peer.accepted_message_ids();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_waiting_message_s_envelope_follows_the_final_dot_in_the_same_write() {
    for pipelining in [true, false] {
        let peer = RawPeer::start(pipelining, AfterData::Accept).await;
        let t = one_connection(peer.addr.port());
        let [a, b, c] = ann_bob_cid("raw");
        for result in three_at_once(&t, [&a, &b, &c], false).await {
            assert!(result.unwrap().starts_with("250"));
        }
        let reads = peer.reads();
        // Pipelined: ann's body carries bob's envelope, bob's body cid's, each in one write.
        let carried = |body: &str, to: &str| reads.iter().any(|r| r.ends_with(&dot_then(body, to)));
        assert_eq!(
            carried("ann", "bob"),
            pipelining,
            "{:#?}",
            printable(&reads)
        );
        assert_eq!(
            carried("bob", "cid"),
            pipelining,
            "{:#?}",
            printable(&reads)
        );
    }
}

/// The end of `name`'s body (as `ann_bob_cid` makes it), then the envelope to `to`.
fn dot_then(name: &str, to: &str) -> Vec<u8> {
    format!("Hello {name}\r\n.\r\nMAIL FROM:<{FROM}>\r\nRCPT TO:<{to}@example.org>\r\nDATA\r\n")
        .into_bytes()
}

#[tokio::test]
async fn the_message_after_the_dot_gets_its_own_refusal_and_the_first_keeps_its_reply() {
    let peer = pipelining_peer().await;
    peer.fault_for_recipient(
        "bob@",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user".into(),
        },
    );
    let t = one_connection(peer.port());
    let [a, b, c] = ann_bob_cid("next");
    let [a, b, c] = three_at_once(&t, [&a, &b, &c], false).await;
    assert!(a.unwrap().starts_with("250"));
    assert_eq!(
        b,
        Err(SendError::Permanent {
            reply: "550 5.1.1 No such user".into(),
            bad_address: true
        })
    );
    assert!(c.unwrap().starts_with("250"));
    assert_eq!(accepted_ids(&peer), ["a@next", "c@next"]);
}

#[tokio::test]
async fn a_refused_body_still_hands_the_connection_to_the_next_message() {
    let peer = pipelining_peer().await;
    peer.fault_for_recipient(
        "ann@",
        Fault::Reply {
            at: Stage::AfterDot,
            code: 554,
            text: "5.7.1 Spam".into(),
        },
    );
    let t = one_connection(peer.port());
    let [a, b, c] = ann_bob_cid("spam");
    let [a, b, c] = three_at_once(&t, [&a, &b, &c], false).await;
    assert!(matches!(a, Err(SendError::Permanent { .. })), "{a:?}");
    assert!(b.unwrap().starts_with("250"));
    assert!(c.unwrap().starts_with("250"));
    assert_eq!(accepted_ids(&peer), ["b@spam", "c@spam"]);
    assert_eq!(peer.connections(), 1, "the connection carried all three");
}

#[tokio::test]
async fn when_the_connection_breaks_after_a_dot_the_next_message_goes_out_once_on_a_new_one() {
    let hang_up = Fault::HangUp {
        at: Stage::AfterDot,
    };
    let closing = Fault::Reply {
        at: Stage::AfterDot,
        code: 421,
        text: "4.3.2 Closing".into(),
    };
    for fault in [hang_up, closing, Fault::AcceptThenHangUp] {
        let peer = pipelining_peer().await;
        peer.fault_for_recipient("ann@", fault.clone());
        let t = one_connection(peer.port());
        let [a, b, c] = ann_bob_cid("broken");
        let [a, b, c] = three_at_once(&t, [&a, &b, &c], false).await;
        match (&fault, &a) {
            (Fault::Reply { .. }, Err(SendError::Transient(reply))) => {
                assert_eq!(reply, "421 4.3.2 Closing")
            }
            (Fault::HangUp { .. } | Fault::AcceptThenHangUp, Err(SendError::Ambiguous(_))) => {}
            _ => panic!("{fault:?}: {a:?}"),
        }
        assert!(b.unwrap().starts_with("250"), "{fault:?}");
        assert!(c.unwrap().starts_with("250"), "{fault:?}");
        let mut expected = vec!["b@broken", "c@broken"];
        if fault == Fault::AcceptThenHangUp {
            expected.insert(0, "a@broken");
        }
        assert_eq!(accepted_ids(&peer), expected, "{fault:?}");
        assert_eq!(peer.connections(), 2, "{fault:?}");
    }
}

#[tokio::test]
async fn a_handed_over_message_that_is_withdrawn_sends_no_body() {
    let peer = RawPeer::start(true, AfterData::Accept).await;
    let t = one_connection(peer.addr.port());
    let [a, b, c] = ann_bob_cid("withdrawn");
    let [a, b, c] = three_at_once(&t, [&a, &b, &c], true).await;
    assert!(a.unwrap().starts_with("250"));
    assert_eq!(b, Err(SendError::Withdrawn));
    assert!(c.unwrap().starts_with("250"));
    let reads = peer.reads();
    // Bob's envelope went out after ann's dot, so bob was handed the connection...
    assert!(
        reads.iter().any(|r| r.ends_with(&dot_then("ann", "bob"))),
        "{:#?}",
        printable(&reads)
    );
    // ...and withdrew: none of bob's body left, cid's went out.
    let received = String::from_utf8_lossy(&peer.received()).into_owned();
    assert!(!received.contains("Hello bob"), "{received}");
    assert!(received.contains("Hello cid\r\n.\r\n"), "{received}");
}

#[tokio::test]
async fn a_message_taken_from_the_line_that_stops_waiting_costs_the_connection_but_no_mail() {
    let peer = pipelining_peer().await;
    let t = one_connection(peer.port());
    let [a, b, c] = ann_bob_cid("dropped");
    let give_up = tokio::sync::Notify::new();
    let (first, second) = tokio::join!(
        t.deliver(&a, || async {
            // Ann's dot is answered late: bob, already taken from the line with his envelope
            // after ann's dot, stops waiting before the answer comes.
            peer.set_reply_delay(Duration::from_millis(300));
            give_up.notify_one();
            true
        }),
        async {
            tokio::select! {
                result = t.deliver(&b, || async { true }) => Some(result),
                () = async {
                    give_up.notified().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                } => None,
            }
        },
    );
    assert!(first.unwrap().starts_with("250"));
    assert!(second.is_none(), "bob stopped waiting: {second:?}");
    peer.set_reply_delay(Duration::ZERO);
    assert!(send(&t, &c).await.unwrap().starts_with("250"));
    assert_eq!(accepted_ids(&peer), ["a@dropped", "c@dropped"]);
    let mails = peer
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 3, "bob's envelope went out after ann's dot");
    assert_eq!(
        peer.connections(),
        2,
        "the connection in bob's envelope was closed"
    );
}

#[tokio::test]
async fn a_message_that_stops_waiting_leaves_the_line() {
    let peer = pipelining_peer().await;
    let t = one_connection(peer.port());
    let [a, b, c] = ann_bob_cid("gone");
    let (first, gave_up) = tokio::join!(
        t.deliver(&a, || async {
            // The second message gives up while this one holds the only connection.
            tokio::time::sleep(Duration::from_millis(200)).await;
            true
        }),
        tokio::time::timeout(Duration::from_millis(50), t.deliver(&b, || async { true })),
    );
    assert!(first.unwrap().starts_with("250"));
    assert!(gave_up.is_err(), "the second message stopped waiting");
    // Its envelope never went out, and the connection goes on to carry the next message.
    assert!(send(&t, &c).await.unwrap().starts_with("250"));
    assert_eq!(accepted_ids(&peer), ["a@gone", "c@gone"]);
    assert_eq!(peer.connections(), 1);
    let mails = peer
        .commands()
        .iter()
        .filter(|c| c.starts_with("MAIL"))
        .count();
    assert_eq!(mails, 2, "{:?}", peer.commands());
}
