//! The SMTP test peer's own tests: it must behave as each fault says before other tests
//! rely on it.

mod support;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::{Duration, Instant};

use support::smtp::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::task::JoinSet;

type Transport = AsyncSmtpTransport<Tokio1Executor>;

fn transport(peer: &SmtpPeer) -> Transport {
    Transport::builder_dangerous("127.0.0.1")
        .port(peer.port())
        .timeout(Some(Duration::from_secs(5)))
        .build()
}

fn message(to: &str, id: &str) -> Message {
    Message::builder()
        .from("Shop <shop@example.com>".parse::<Mailbox>().unwrap())
        .to(to.parse::<Mailbox>().unwrap())
        .subject("Thank you")
        .message_id(Some(format!("<{id}>")))
        .body(String::from(
            "Hello,\r\n.a line starting with a dot\r\n..two\r\nBye\r\n",
        ))
        .unwrap()
}

/// Sends with a deadline: lettre's own timeout covers only the TCP connect.
async fn send(
    t: &Transport,
    m: Message,
) -> Result<lettre::transport::smtp::response::Response, lettre::transport::smtp::Error> {
    tokio::time::timeout(Duration::from_secs(10), t.send(m))
        .await
        .expect("lettre returned within 10 s")
}

#[tokio::test]
async fn lettre_message_is_recorded_with_its_message_id() {
    let peer = SmtpPeer::start().await;
    let reply = send(
        &transport(&peer),
        message("ann@example.org", "m-1@touchpoint"),
    )
    .await
    .unwrap();
    assert_eq!(reply.code().to_string(), "250");
    assert!(peer.wait_for_accepted(1, Duration::from_secs(1)).await);
    let accepted = peer.accepted();
    assert_eq!(accepted.len(), 1);
    let a = &accepted[0];
    assert_eq!(a.mail_from, "shop@example.com");
    assert_eq!(a.rcpt_to, vec!["ann@example.org".to_owned()]);
    assert_eq!(a.message_id.as_deref(), Some("m-1@touchpoint"));
    assert_eq!(a.auth_user, None);
    let text = String::from_utf8(a.data.clone()).unwrap();
    assert!(
        text.contains("\r\n.a line starting with a dot\r\n..two\r\n"),
        "{text}"
    );
    assert!(text.ends_with("\r\n"));
    assert_eq!(
        peer.accepted_message_ids(),
        vec!["m-1@touchpoint".to_owned()]
    );
    assert_eq!(peer.connections(), 1);
    // Without the `pool` feature, lettre opens a connection per message and ends it with
    // QUIT; it never sends RSET or NOOP.
    let verbs: Vec<String> = peer
        .commands()
        .iter()
        .map(|c| c.split([' ', ':']).next().unwrap().to_owned())
        .collect();
    assert_eq!(
        verbs,
        ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"],
        "has lettre's `pool` feature been turned on? Then it reuses connections and sends NOOP \
         before each reuse instead"
    );
}

#[tokio::test]
async fn auth_plain_and_login_record_the_user() {
    let peer = SmtpPeer::start().await;
    for (mechanism, user) in [(Mechanism::Plain, "alice"), (Mechanism::Login, "bob")] {
        let t = Transport::builder_dangerous("127.0.0.1")
            .port(peer.port())
            .credentials(Credentials::new(user.into(), "secret".into()))
            .authentication(vec![mechanism])
            .build();
        send(&t, message("ann@example.org", &format!("{user}@id")))
            .await
            .unwrap();
    }
    assert_eq!(peer.auth_users(), ["alice", "bob"]);
    let users: Vec<_> = peer.accepted().into_iter().map(|a| a.auth_user).collect();
    assert_eq!(users, [Some("alice".into()), Some("bob".into())]);
}

#[tokio::test]
async fn greeting_421_is_transient() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Greeting421);
    let err = send(&transport(&peer), message("a@example.org", "x@y"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.status().map(|c| c.to_string()).as_deref(), Some("421"));
    assert!(err.to_string().contains("Service not available"), "{err}");
    assert!(peer.accepted().is_empty());
    assert_eq!(peer.connections(), 1);
}

#[tokio::test]
async fn drop_on_connect_is_a_response_error_without_code() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::DropOnConnect);
    let err = send(&transport(&peer), message("a@example.org", "x@y"))
        .await
        .unwrap_err();
    // lettre reads EOF where the greeting should be: "response error: incomplete response".
    assert!(err.is_response(), "{err:?}");
    assert!(!err.is_transient() && !err.is_permanent());
    assert_eq!(err.status(), None);
    assert!(err.to_string().contains("incomplete response"), "{err}");
    assert_eq!(peer.connections(), 1);
}

#[tokio::test]
async fn reply_faults_are_transient_or_permanent_by_code() {
    let cases = [
        (Stage::Mail, 451, "4.3.0 Try later", false),
        (Stage::Rcpt, 550, "5.1.1 No such user", true),
        (Stage::Data, 554, "5.6.0 No thanks", true),
        (Stage::AfterDot, 452, "4.3.1 Insufficient storage", false),
        (Stage::AfterDot, 550, "5.7.1 Spam", true),
    ];
    for (at, code, text, permanent) in cases {
        let peer = SmtpPeer::start().await;
        peer.set_fault(Fault::Reply {
            at,
            code,
            text: text.into(),
        });
        let err = send(&transport(&peer), message("a@example.org", "x@y"))
            .await
            .unwrap_err();
        assert_eq!(err.is_permanent(), permanent, "{at:?}: {err:?}");
        assert_eq!(err.is_transient(), !permanent, "{at:?}: {err:?}");
        assert_eq!(err.status().unwrap().to_string(), code.to_string());
        assert!(err.to_string().contains(text), "{err}");
        assert!(peer.accepted().is_empty(), "{at:?}");
        // After a negative reply lettre sends QUIT and drops the connection (no RSET).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(peer.commands().last().unwrap(), "QUIT", "{at:?}");
    }
}

#[tokio::test]
async fn a_2xx_reply_after_the_dot_is_an_acceptance() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::Reply {
        at: Stage::AfterDot,
        code: 250,
        text: "2.0.0 Ok: queued as ABC123".into(),
    });
    let reply = send(&transport(&peer), message("a@example.org", "ok@id"))
        .await
        .unwrap();
    assert_eq!(
        reply.message().collect::<Vec<_>>(),
        ["2.0.0 Ok: queued as ABC123"]
    );
    assert_eq!(peer.accepted_message_ids(), ["ok@id"]);
}

#[tokio::test]
async fn hang_ups_are_response_errors_and_only_accept_then_hang_up_records() {
    let faults = [
        (Fault::HangUp { at: Stage::Mail }, false),
        (Fault::HangUp { at: Stage::Rcpt }, false),
        (Fault::HangUp { at: Stage::Data }, false),
        (
            Fault::HangUp {
                at: Stage::AfterDot,
            },
            false,
        ),
        (Fault::AcceptThenHangUp, true),
    ];
    for (fault, recorded) in faults {
        let peer = SmtpPeer::start().await;
        peer.set_fault(fault.clone());
        let err = send(&transport(&peer), message("a@example.org", "hu@id"))
            .await
            .unwrap_err();
        assert!(err.is_response(), "{fault:?}: {err:?}");
        assert_eq!(err.status(), None, "{fault:?}");
        assert!(err.to_string().contains("incomplete response"), "{err}");
        assert_eq!(peer.accepted().len(), usize::from(recorded), "{fault:?}");
    }
}

#[tokio::test]
async fn silent_after_dot_hangs_lettre_past_its_own_timeout() {
    let peer = SmtpPeer::start().await;
    peer.set_fault(Fault::SilentAfterDot);
    let t = Transport::builder_dangerous("127.0.0.1")
        .port(peer.port())
        .timeout(Some(Duration::from_millis(100)))
        .build();
    let started = Instant::now();
    let outcome = tokio::time::timeout(
        Duration::from_millis(700),
        t.send(message("a@example.org", "s@id")),
    )
    .await;
    assert!(outcome.is_err(), "lettre gave up by itself: {outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(700));
    assert!(peer.accepted().is_empty());
    let verbs: Vec<String> = peer.commands().into_iter().collect();
    assert_eq!(verbs.last().unwrap(), "DATA");
}

#[tokio::test]
async fn recipient_fault_affects_only_that_recipient() {
    let peer = SmtpPeer::start().await;
    peer.fault_for_recipient(
        "bounce",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user".into(),
        },
    );
    peer.fault_for_recipient("unknown", Fault::AcceptThenHangUp);
    peer.set_fault(Fault::Reply {
        at: Stage::AfterDot,
        code: 451,
        text: "4.0.0 global".into(),
    });
    let t = transport(&peer);
    // The global fault applies to a recipient without one...
    let err = send(&t, message("ann@example.org", "1@id"))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    // ...a recipient fault at RCPT rejects that recipient...
    let err = send(&t, message("bounce@example.org", "2@id"))
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err:?}");
    assert!(err.to_string().contains("No such user"));
    // ...and a later-stage recipient fault replaces the global one.
    let err = send(&t, message("unknown@example.org", "3@id"))
        .await
        .unwrap_err();
    assert!(err.is_response(), "{err:?}");
    assert_eq!(peer.accepted_message_ids(), ["3@id"]);

    peer.clear_faults();
    send(&t, message("ann@example.org", "4@id")).await.unwrap();
    peer.fault_for_recipient(
        "bounce",
        Fault::Reply {
            at: Stage::Rcpt,
            code: 550,
            text: "5.1.1 No such user".into(),
        },
    );
    // lettre gives up the whole message when any RCPT is refused.
    let two = Message::builder()
        .from("shop@example.com".parse::<Mailbox>().unwrap())
        .to("ann@example.org".parse::<Mailbox>().unwrap())
        .to("bounce@example.org".parse::<Mailbox>().unwrap())
        .message_id(Some("<5@id>".into()))
        .body(String::from("hi"))
        .unwrap();
    let err = send(&t, two).await.unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(peer.accepted_message_ids(), ["3@id", "4@id"]);
}

#[tokio::test]
async fn several_messages_over_one_lettre_connection() {
    let peer = SmtpPeer::start().await;
    let mut conn = AsyncSmtpConnection::connect_tokio1(
        peer.addr(),
        Some(Duration::from_secs(5)),
        &ClientId::Domain("client.test".into()),
        None,
        None,
    )
    .await
    .unwrap();
    for i in 0..3 {
        let m = message("ann@example.org", &format!("{i}@conn"));
        conn.send(m.envelope(), &m.formatted()).await.unwrap();
    }
    assert!(conn.test_connected().await);
    conn.quit().await.unwrap();
    assert_eq!(peer.connections(), 1);
    let accepted = peer.accepted();
    assert_eq!(peer.accepted_message_ids(), ["0@conn", "1@conn", "2@conn"]);
    assert!(accepted.iter().all(|a| a.connection == 0));
    assert_eq!(peer.commands().iter().filter(|c| *c == "NOOP").count(), 1);
}

async fn expect(reader: &mut BufReader<OwnedReadHalf>, code: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        assert!(line.starts_with(code), "expected {code}, got {line:?}");
        all.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return all;
        }
    }
}

#[tokio::test]
async fn raw_conversation() {
    let peer = SmtpPeer::start().await;
    let (r, mut w) = TcpStream::connect(peer.addr()).await.unwrap().into_split();
    let mut r = BufReader::new(r);
    expect(&mut r, "220").await;
    w.write_all(b"MAIL FROM:<a@b>\r\n").await.unwrap();
    expect(&mut r, "503").await;
    w.write_all(b"EHLO me\r\n").await.unwrap();
    let ehlo = expect(&mut r, "250").await;
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    assert!(ehlo.ends_with("250 SIZE 52428800\r\n"), "{ehlo}");
    w.write_all(b"AUTH PLAIN\r\n").await.unwrap();
    expect(&mut r, "334").await;
    w.write_all(b"AHVzZXIAcGFzcw==\r\n").await.unwrap();
    expect(&mut r, "235").await;
    w.write_all(b"VRFY someone\r\n").await.unwrap();
    expect(&mut r, "502").await;
    w.write_all(b"DATA\r\n").await.unwrap();
    expect(&mut r, "503").await;
    w.write_all(b"mail from:<>\r\nrcpt to:<x@y>\r\nRSET\r\nNOOP\r\n")
        .await
        .unwrap();
    for code in ["250", "250", "250", "250"] {
        expect(&mut r, code).await;
    }
    w.write_all(b"MAIL FROM:<>\r\nDATA\r\n").await.unwrap();
    expect(&mut r, "250").await;
    expect(&mut r, "554").await;
    w.write_all(b"RCPT TO:<x@y>\r\nRCPT TO:<z@y> NOTIFY=NEVER\r\nDATA\r\n")
        .await
        .unwrap();
    for code in ["250", "250", "354"] {
        expect(&mut r, code).await;
    }
    let body = "Subject: hi\r\nmessage-id:\r\n  <folded@id>\r\nX: y\r\n\r\n..dot\r\n.\r\n";
    w.write_all(body.as_bytes()).await.unwrap();
    expect(&mut r, "250").await;
    // A too-long command line is refused and the connection goes on.
    w.write_all(&vec![b'A'; MAX_COMMAND_LINE + 10])
        .await
        .unwrap();
    w.write_all(b"\r\nQUIT\r\n").await.unwrap();
    expect(&mut r, "500").await;
    expect(&mut r, "221").await;
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).await.unwrap(), 0);
    let a = &peer.accepted()[0];
    assert_eq!(a.mail_from, "");
    assert_eq!(a.rcpt_to, ["x@y", "z@y"]);
    assert_eq!(a.message_id.as_deref(), Some("folded@id"));
    assert_eq!(a.auth_user.as_deref(), Some("user"));
    assert!(a.data.ends_with(b"\r\n\r\n.dot\r\n"));
}

#[tokio::test]
async fn reply_delay_slows_every_reply() {
    let peer = SmtpPeer::start().await;
    peer.set_reply_delay(Duration::from_millis(60));
    let started = Instant::now();
    send(&transport(&peer), message("a@example.org", "slow@id"))
        .await
        .unwrap();
    // greeting, EHLO, MAIL, RCPT, DATA, final dot
    assert!(
        started.elapsed() >= Duration::from_millis(6 * 60),
        "{:?}",
        started.elapsed()
    );
    peer.set_reply_delay(Duration::ZERO);
    let started = Instant::now();
    send(&transport(&peer), message("a@example.org", "fast@id"))
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(300));
}

#[tokio::test]
async fn restart_on_the_same_port() {
    let peer = SmtpPeer::start().await;
    let addr = peer.addr();
    let t = transport(&peer);
    send(&t, message("a@example.org", "before@id"))
        .await
        .unwrap();
    drop(peer);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let err = send(&t, message("a@example.org", "down@id"))
        .await
        .unwrap_err();
    // Connection refused: neither transient nor permanent, no code.
    assert_eq!(err.status(), None, "{err:?}");
    assert!(!err.is_response() && !err.is_transient(), "{err:?}");
    let peer = SmtpPeer::start_on(addr).await.unwrap();
    assert_eq!(peer.addr(), addr);
    send(&t, message("a@example.org", "after@id"))
        .await
        .unwrap();
    assert_eq!(peer.accepted_message_ids(), ["after@id"]);
    // An immediate restart (the old listener is still being dropped) works too.
    drop(peer);
    let peer = SmtpPeer::start_on(addr).await.unwrap();
    send(&t, message("a@example.org", "again@id"))
        .await
        .unwrap();
    assert_eq!(peer.accepted_message_ids(), ["again@id"]);
}

#[tokio::test]
async fn wait_for_accepted_times_out() {
    let peer = SmtpPeer::start().await;
    assert!(!peer.wait_for_accepted(1, Duration::from_millis(50)).await);
    assert!(peer.wait_for_accepted(0, Duration::from_millis(50)).await);
}

#[tokio::test]
async fn large_message() {
    let peer = SmtpPeer::start().await;
    let line = format!("{}\r\n", "x".repeat(76));
    let body = line.repeat(5 * 1024 * 1024 / line.len());
    let m = Message::builder()
        .from("shop@example.com".parse::<Mailbox>().unwrap())
        .to("a@example.org".parse::<Mailbox>().unwrap())
        .message_id(Some("<big@id>".into()))
        .body(body.clone())
        .unwrap();
    send(&transport(&peer), m).await.unwrap();
    let a = &peer.accepted()[0];
    assert_eq!(a.message_id.as_deref(), Some("big@id"));
    // lettre writes CRLF "." CRLF after the body, so a body ending in CRLF arrives with an
    // extra empty line.
    let tail = format!("\r\n\r\n{body}\r\n");
    assert!(
        a.data.ends_with(tail.as_bytes()),
        "{:?}",
        &a.data[a.data.len() - 100..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_connections() {
    let peer = SmtpPeer::start().await;
    let t = transport(&peer);
    let mut sends = JoinSet::new();
    for i in 0..300 {
        let t = t.clone();
        sends.spawn(async move { send(&t, message("a@example.org", &format!("{i}@c"))).await });
    }
    while let Some(r) = sends.join_next().await {
        r.unwrap().unwrap();
    }
    assert_eq!(peer.connections(), 300);
    assert_eq!(peer.accepted_count(), 300);
}

/// About 8 s in a debug build (3 s in release): most of it is lettre building messages.

#[test]
fn base64_and_message_id_parsing() {
    assert_eq!(base64_decode("AHVzZXIAcGFzcw==").unwrap(), b"\0user\0pass");
    assert_eq!(base64_decode("VXNlcm5hbWU6").unwrap(), b"Username:");
    assert_eq!(base64_decode("YQ").unwrap(), b"a");
    assert!(base64_decode("a").is_none());
    assert!(base64_decode("!!!!").is_none());
    assert_eq!(
        message_id(b"From: a\r\nMESSAGE-ID: <x@y>\r\n\r\nMessage-ID: <body@no>\r\n").as_deref(),
        Some("x@y")
    );
    assert_eq!(
        message_id(b"Subject: s\r\n\r\nMessage-ID: <body@no>\r\n"),
        None
    );
    assert_eq!(
        message_id(b"Message-Id:\tbare@id\n\n").as_deref(),
        Some("bare@id")
    );
}
