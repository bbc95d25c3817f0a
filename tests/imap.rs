//! `[replies.imap]` end to end: the real daemon (`touchpoint run`) sends over SMTP to the test
//! peer and watches a mailbox on a real Dovecot that each test starts on its own port, with
//! its own config, users and Maildir. Mail is delivered with IMAP APPEND, as a mail server
//! would; what the daemon did is read back over IMAP (flags, folders) and from the database.

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use mail_parser::MessageParser;
use support::smtp::{Accepted, SmtpPeer};
use support::{Backend, ChildDaemon, Sink, TestEnv, eventually};
use touchpoint::store::{LogFilter, MessageState, SharedStore};

const DOVECOT: &str = "/usr/sbin/dovecot";
const USER: &str = "replies";
const PASSWORD: &str = "s3cret-imap-pass";
const PATIENCE: Duration = Duration::from_secs(40);

const RULES: &str = r#"
[[rule]]
name = "thanks"
template = "thank-you"
subject = "Thank you, {{customer.first_name}}"
when = { event = "purchase", after = "1s" }
"#;

/// A Dovecot of the test's own: config, passwd file and Maildir in a temp dir, IMAP on a free
/// loopback port (and IMAPS with a certificate of the test's own CA when `tls` is asked).
struct Dovecot {
    dir: tempfile::TempDir,
    port: u16,
    tls_port: Option<u16>,
    /// More lines for dovecot.conf.
    extra: String,
    child: Option<Child>,
}

impl Dovecot {
    fn start(tls: bool) -> Dovecot {
        Dovecot::start_with(tls, "")
    }

    fn start_with(tls: bool, extra: &str) -> Dovecot {
        assert!(
            Path::new(DOVECOT).exists(),
            "{DOVECOT} is missing: install Debian's dovecot-imapd (apt-get install dovecot-imapd); \
             the IMAP tests run against a real Dovecot"
        );
        let dir = tempfile::Builder::new()
            .prefix("touchpoint-dovecot-")
            .tempdir()
            .expect("temp dir");
        // Dovecot's mail processes run as nobody: they must reach the Maildir.
        set_mode(dir.path(), 0o755);
        std::fs::create_dir_all(dir.path().join("mail")).expect("mail dir");
        set_mode(&dir.path().join("mail"), 0o777);
        std::fs::write(
            dir.path().join("passwd"),
            format!("{USER}:{{PLAIN}}{PASSWORD}\n"),
        )
        .expect("passwd");
        let tls_port = tls.then(|| {
            make_certificates(dir.path());
            support::free_port()
        });
        let mut dovecot = Dovecot {
            port: support::free_port(),
            tls_port,
            extra: extra.to_string(),
            dir,
            child: None,
        };
        dovecot.write_config();
        dovecot.spawn();
        dovecot
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write_config(&self) {
        let dir = self.path().display();
        let ssl = match self.tls_port {
            Some(_) => {
                format!("ssl = yes\nssl_cert = <{dir}/server.pem\nssl_key = <{dir}/server.key\n")
            }
            None => "ssl = no\n".into(),
        };
        let imaps = self.tls_port.unwrap_or(0);
        let config = format!(
            r#"protocols = imap
listen = 127.0.0.1
base_dir = {dir}/run
state_dir = {dir}/state
instance_name = tp-{port}
log_path = {dir}/dovecot.log
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
default_internal_user = root
default_internal_group = root
default_login_user = nobody
first_valid_uid = 1
mail_location = maildir:{dir}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {dir}/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={dir}/mail/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
  }}
}}
service anvil {{
  chroot =
}}
service auth {{
  user = root
}}
{extra}
"#,
            port = self.port,
            extra = self.extra,
        );
        std::fs::write(self.path().join("dovecot.conf"), config).expect("dovecot.conf");
    }

    /// Starts `dovecot -F` in a process group of its own and waits until it greets.
    fn spawn(&mut self) {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::File::create(self.path().join("dovecot.out")).expect("log");
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(self.path().join("dovecot.conf"))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dovecot");
        self.child = Some(child);
        for _ in 0..100 {
            if let Ok(mut imap) = Imap::connect(self.port) {
                imap.logout();
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("dovecot did not start:\n{}", self.logs());
    }

    /// SIGKILL to the whole process group: the server dies mid-session, connections and all.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
        // The pid file would make a restart think it still runs.
        let _ = std::fs::remove_file(self.path().join("run/master.pid"));
    }

    fn restart(&mut self) {
        self.kill();
        // Its children may take a moment to go; the port must be free again.
        for _ in 0..50 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.spawn();
    }

    fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.path().join(name)).unwrap_or_default();
        format!("{}{}", read("dovecot.out"), read("dovecot.log"))
    }

    fn session(&self) -> Imap {
        let mut imap = Imap::connect(self.port).expect("connect to dovecot");
        imap.ok(&format!("LOGIN {USER} \"{PASSWORD}\""));
        imap
    }

    /// Delivers `mail` into INBOX, as a mail server would.
    fn deliver(&self, mail: &str) {
        let mut imap = self.session();
        imap.append("INBOX", mail.as_bytes());
        imap.logout();
    }

    /// (unseen, seen) message counts of `folder`.
    fn counts(&self, folder: &str) -> (usize, usize) {
        let mut imap = self.session();
        imap.ok(&format!("SELECT \"{folder}\""));
        let count = |imap: &mut Imap, what: &str| {
            imap.ok(&format!("SEARCH {what}"))
                .iter()
                .filter_map(|l| l.strip_prefix("* SEARCH"))
                .map(|l| l.split_whitespace().count())
                .sum()
        };
        let counts = (count(&mut imap, "UNSEEN"), count(&mut imap, "SEEN"));
        imap.logout();
        counts
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.kill();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A CA and a certificate for `localhost` signed by it (`ca.pem`, `server.pem`, `server.key`).
fn make_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=touchpoint test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .expect("san.ext");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.pem",
    ]);
    set_mode(&dir.join("server.key"), 0o644);
}

/// A tiny blocking IMAP client for the test's own look at the mailbox.
struct Imap {
    reader: BufReader<TcpStream>,
    tag: u32,
}

impl Imap {
    fn connect(port: u16) -> std::io::Result<Imap> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut imap = Imap {
            reader: BufReader::new(stream),
            tag: 0,
        };
        let greeting = imap.line()?;
        if !greeting.starts_with("* OK") {
            return Err(std::io::Error::other(greeting));
        }
        Ok(imap)
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other("closed"));
        }
        Ok(line.trim_end().to_string())
    }

    fn send(&mut self, command: &str) -> String {
        self.tag += 1;
        let tag = format!("x{}", self.tag);
        write!(self.reader.get_mut(), "{tag} {command}\r\n").expect("write");
        tag
    }

    /// The untagged lines of a command that must succeed (literals skipped).
    fn ok(&mut self, command: &str) -> Vec<String> {
        let tag = self.send(command);
        self.finish(&tag, command)
    }

    fn finish(&mut self, tag: &str, command: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().expect("read");
            if let Some(size) = line
                .strip_suffix('}')
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok())
            {
                let mut skip = vec![0; size];
                self.reader.read_exact(&mut skip).expect("literal");
            }
            if let Some(rest) = line.strip_prefix(&format!("{tag} ")) {
                assert!(rest.starts_with("OK"), "{command}: {line}");
                return lines;
            }
            lines.push(line);
        }
    }

    fn append(&mut self, folder: &str, mail: &[u8]) {
        let command = format!("APPEND \"{folder}\" {{{}}}", mail.len());
        let tag = self.send(&command);
        let go = self.line().expect("continuation");
        assert!(go.starts_with('+'), "APPEND: {go}");
        let stream = self.reader.get_mut();
        stream.write_all(mail).expect("literal");
        stream.write_all(b"\r\n").expect("crlf");
        self.finish(&tag, "APPEND");
    }

    fn logout(&mut self) {
        let tag = self.send("LOGOUT");
        let _ = (|| -> std::io::Result<()> {
            while !self.line()?.starts_with(&tag) {}
            Ok(())
        })();
    }
}

/// `[replies]` with the watcher on this Dovecot; `extra` adds keys to `[replies.imap]`.
fn replies_config(port: u16, extra: &str) -> String {
    format!(
        "[replies]\naddress = \"replies@acme.example\"\n\n[replies.imap]\nhost = \"127.0.0.1\"\n\
         port = {port}\ntls = \"none\"\nusername = \"{USER}\"\npassword_env = \"TP_IMAP_PASSWORD\"\n\
         poll_every = \"20s\"\ntimeout = \"5s\"\n{extra}"
    )
}

struct World {
    peer: SmtpPeer,
    env: TestEnv,
    store: SharedStore,
}

impl World {
    async fn new(backend: Backend, config: &str, customers: &[&str]) -> World {
        let peer = SmtpPeer::start().await;
        let env = TestEnv::new(backend, Sink::Smtp(&peer), &[("r.toml", RULES)], config).await;
        let store = env.store().await;
        for id in customers {
            let name = format!("{}{} Tester", id[..1].to_uppercase(), &id[1..]);
            env.add_customer(&store, id, &format!("{id}@example.com"), &name, None)
                .await;
            env.add_event(&store, &format!("p-{id}"), id, "purchase", Utc::now())
                .await;
        }
        World { peer, env, store }
    }

    fn daemon(&self, password: &str) -> ChildDaemon {
        ChildDaemon::start(&self.env, "daemon", "", &[("TP_IMAP_PASSWORD", password)])
    }

    /// The thank-you to `customer` as the SMTP peer received it.
    async fn sent(&self, customer: &str, daemon: &ChildDaemon) -> Accepted {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let log = self.store.log(&LogFilter::default()).await.expect("log");
            let sent = log.into_iter().find(|e| {
                e.rule == "thanks" && e.customer_id == customer && e.state == MessageState::Sent
            });
            if let Some(id) = sent.and_then(|e| e.message_id) {
                let id = id.trim_matches(['<', '>']).to_string();
                if let Some(accepted) = self
                    .peer
                    .accepted()
                    .into_iter()
                    .find(|a| a.message_id.as_deref() == Some(&id))
                {
                    return accepted;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no thank-you sent to {customer}:\n{}",
                daemon.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn events(&self, customer: &str, kind: &str) -> Vec<serde_json::Value> {
        let events = self
            .store
            .customer_events(customer, 100)
            .await
            .expect("events");
        events
            .into_iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.data)
            .collect()
    }

    /// Waits until `customer` has `n` events of `kind`.
    async fn wait_events(&self, customer: &str, kind: &str, n: usize, daemon: &ChildDaemon) {
        let found = eventually(PATIENCE, || async {
            self.events(customer, kind).await.len() >= n
        })
        .await;
        assert!(found, "no {kind} event for {customer}:\n{}", daemon.log());
    }
}

fn reply_to(accepted: &Accepted) -> String {
    let message = MessageParser::default()
        .parse(&accepted.data)
        .expect("parses");
    let address = message
        .reply_to()
        .and_then(|r| r.first())
        .and_then(|a| a.address());
    address.expect("a Reply-To address").to_string()
}

fn mail(from: &str, to: &str, id: &str, headers: &str, body: &str) -> String {
    format!(
        "From: {from}\r\nTo: {to}\r\nSubject: Re: Thank you\r\nMessage-ID: <{id}>\r\n\
         Date: Thu, 3 Dec 2026 10:00:00 +0000\r\n{headers}\r\n{body}"
    )
}

/// Blocking calls (the test's IMAP client) off the async test's threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

async fn replies_auto_replies_and_junk_from_the_mailbox(backend: Backend) {
    let dovecot = std::sync::Arc::new(Dovecot::start(false));
    let config = replies_config(dovecot.port, "");
    let world = World::new(backend, &config, &["ada", "grace"]).await;
    let daemon = world.daemon(PASSWORD);
    daemon.ready().await;
    let ada = world.sent("ada", &daemon).await;
    let grace = world.sent("grace", &daemon).await;

    // Ada answers through the tagged Reply-To, while the daemon runs.
    let ada_reply = mail(
        "Ada <ada@example.com>",
        &reply_to(&ada),
        "ada-answer@example.com",
        "",
        "The roses are lovely, thank you!\r\n\r\n> Thank you for your order\r\n",
    );
    let d = dovecot.clone();
    let delivered = ada_reply.clone();
    blocking(move || d.deliver(&delivered)).await;
    world.wait_events("ada", "replied", 1, &daemon).await;
    let replied = world.events("ada", "replied").await;
    assert_eq!(replied[0]["rule"], "thanks", "{replied:?}");
    assert_eq!(
        replied[0]["snippet"], "The roses are lovely, thank you!",
        "{replied:?}"
    );
    let d = dovecot.clone();
    blocking(move || d.wait_for_counts("INBOX", (0, 1))).await;

    // Grace's out-of-office note answers her thank-you by In-Reply-To.
    let grace_id = grace.message_id.clone().expect("message id");
    let auto = mail(
        "Grace <grace@example.com>",
        "Acme Flowers <hello@acme.example>",
        "grace-ooo@example.com",
        &format!("In-Reply-To: <{grace_id}>\r\nAuto-Submitted: auto-replied\r\n"),
        "I am away until Monday.\r\n",
    );
    // Junk: from no customer, naming none of our messages.
    let junk = mail(
        "Spammer <offers@junk.example>",
        "hello@acme.example",
        "junk-1@junk.example",
        "",
        "Cheap watches!\r\n",
    );
    let d = dovecot.clone();
    blocking(move || {
        d.deliver(&auto);
        d.deliver(&junk);
        // The same reply again (a second delivery): processed, but counted once.
        d.deliver(&ada_reply);
    })
    .await;
    world.wait_events("grace", "auto_replied", 1, &daemon).await;
    let d = dovecot.clone();
    blocking(move || d.wait_for_counts("INBOX", (0, 4))).await;
    let log = daemon.log();
    assert!(
        log.contains("inbound mail ignored: no message or customer matches this mail (from offers@junk.example)"),
        "the junk is logged with the reason:\n{log}"
    );
    assert!(
        log.contains("a repeat of a mail it had, counted once"),
        "{log}"
    );
    assert_eq!(
        world.events("ada", "replied").await.len(),
        1,
        "recorded once"
    );
    assert!(world.events("grace", "replied").await.is_empty());
    assert!(!log.contains(PASSWORD), "the password stays out of the log");
    daemon.stop().await;
}

impl Dovecot {
    /// Waits until `folder` holds exactly (unseen, seen) messages.
    fn wait_for_counts(&self, folder: &str, expected: (usize, usize)) {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            let counts = self.counts(folder);
            if counts == expected {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{folder}: (unseen, seen) = {counts:?}, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

on_both_backends!(replies_auto_replies_and_junk_from_the_mailbox);

/// `after = "move"`: processed mail goes to a folder the watcher creates; the server is killed
/// and restarted, and the watcher reconnects and processes what arrives after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_mail_and_a_server_that_dies_and_comes_back() {
    let dovecot = std::sync::Arc::new(std::sync::Mutex::new(Dovecot::start(false)));
    let port = dovecot.lock().unwrap().port;
    let config = replies_config(port, "after = \"move\"\nmove_to = \"Processed\"\n");
    let world = World::new(Backend::Sqlite, &config, &["ada", "grace"]).await;
    let daemon = world.daemon(PASSWORD);
    daemon.ready().await;
    let ada = world.sent("ada", &daemon).await;
    let grace = world.sent("grace", &daemon).await;

    let first = mail(
        "ada@example.com",
        &reply_to(&ada),
        "ada-1@example.com",
        "",
        "Lovely.\r\n",
    );
    let d = dovecot.clone();
    blocking(move || d.lock().unwrap().deliver(&first)).await;
    world.wait_events("ada", "replied", 1, &daemon).await;
    let d = dovecot.clone();
    blocking(move || {
        let d = d.lock().unwrap();
        d.wait_for_counts("INBOX", (0, 0));
        // Moved as it was: still unread, for the owner to read in Processed.
        d.wait_for_counts("Processed", (1, 0));
    })
    .await;

    let d = dovecot.clone();
    blocking(move || d.lock().unwrap().restart()).await;
    let second = mail(
        "grace@example.com",
        &reply_to(&grace),
        "grace-1@example.com",
        "",
        "Thanks!\r\n",
    );
    let d = dovecot.clone();
    blocking(move || d.lock().unwrap().deliver(&second)).await;
    world.wait_events("grace", "replied", 1, &daemon).await;
    let d = dovecot.clone();
    blocking(move || {
        let d = d.lock().unwrap();
        d.wait_for_counts("INBOX", (0, 0));
        d.wait_for_counts("Processed", (2, 0));
    })
    .await;
    let log = daemon.log();
    assert!(
        log.contains("[replies.imap] 127.0.0.1") && log.contains("reconnecting in"),
        "the dropped connection is logged:\n{log}"
    );
    assert!(
        log.matches("[replies.imap] logged in").count() >= 2,
        "it logged in again:\n{log}"
    );
    daemon.stop().await;
}

/// A wrong password is logged clearly (the username, never the password), /healthz says so,
/// and sending goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_and_sending_goes_on() {
    let dovecot = Dovecot::start(false);
    let config = replies_config(dovecot.port, "");
    let world = World::new(Backend::Sqlite, &config, &["ada"]).await;
    let wrong = "not-the-right-one";
    let daemon = world.daemon(wrong);
    daemon.ready().await;
    world.sent("ada", &daemon).await;
    let refused = eventually(PATIENCE, || async {
        daemon.log().contains("refused the login of \"replies\"")
    })
    .await;
    let log = daemon.log();
    assert!(refused, "{log}");
    assert!(log.contains("[replies.imap]"), "{log}");
    assert!(
        !log.contains(wrong),
        "the password stays out of the log:\n{log}"
    );
    let health = support::http::get(daemon.http, "/healthz", &[]).await;
    assert_eq!(health.status, 200, "a mailbox problem is no daemon failure");
    let body = String::from_utf8_lossy(&health.body).to_string();
    assert!(
        body.contains("\"replies_imap\"") && body.contains("refused the login"),
        "{body}"
    );
    let metrics = support::http::get(daemon.http, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        metrics.contains("\ntouchpoint_replies_imap_up 0\n"),
        "{metrics}"
    );

    // Another customer buys after the login failed: the thank-you still goes out.
    world
        .env
        .add_customer(
            &world.store,
            "grace",
            "grace@example.com",
            "Grace Hopper",
            None,
        )
        .await;
    world
        .env
        .add_event(&world.store, "p-grace", "grace", "purchase", Utc::now())
        .await;
    world.sent("grace", &daemon).await;
    daemon.stop().await;
}

/// Implicit TLS to a server whose certificate is signed by a CA of the test's own, trusted
/// through `ca_file`; an untrusted certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let dovecot = std::sync::Arc::new(Dovecot::start(true));
    let tls_port = dovecot.tls_port.expect("imaps port");
    let ca: PathBuf = dovecot.path().join("ca.pem");
    let config = format!(
        "[replies]\naddress = \"replies@acme.example\"\n\n[replies.imap]\nhost = \"localhost\"\n\
         port = {tls_port}\ntls = \"tls\"\nca_file = \"{}\"\nusername = \"{USER}\"\n\
         password_env = \"TP_IMAP_PASSWORD\"\ntimeout = \"5s\"\n",
        ca.display()
    );
    let world = World::new(Backend::Sqlite, &config, &["ada"]).await;
    let daemon = world.daemon(PASSWORD);
    daemon.ready().await;
    let ada = world.sent("ada", &daemon).await;
    let reply = mail(
        "ada@example.com",
        &reply_to(&ada),
        "ada-tls@example.com",
        "",
        "Over TLS.\r\n",
    );
    let d = dovecot.clone();
    blocking(move || d.deliver(&reply)).await;
    world.wait_events("ada", "replied", 1, &daemon).await;
    daemon.stop().await;

    // Without the CA, the certificate is not trusted: logged, nothing read.
    let untrusted = config.replace(&format!("ca_file = \"{}\"\n", ca.display()), "");
    std::fs::write(&world.env.config_path, {
        let text = std::fs::read_to_string(&world.env.config_path).expect("config");
        text.replace(&config, &untrusted)
    })
    .expect("config");
    let daemon = ChildDaemon::start(
        &world.env,
        "untrusted",
        "",
        &[("TP_IMAP_PASSWORD", PASSWORD)],
    );
    daemon.ready().await;
    let refused = eventually(PATIENCE, || async {
        daemon.log().contains("TLS with localhost failed")
    })
    .await;
    assert!(refused, "{}", daemon.log());
    daemon.stop().await;
}

/// `touchpoint check` names a mistake in `[replies.imap]` with its file and line, says what a
/// missing password needs, and describes a good section.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_explains_the_imap_section() {
    let port = support::free_port();
    let good = replies_config(port, "");
    let env = TestEnv::new(Backend::Sqlite, Sink::Files, &[("r.toml", RULES)], &good).await;
    let (ok, out, err) = env.run_cli(&["check"]);
    assert!(!ok, "the password variable is not set: {out}{err}");
    assert!(err.contains("TP_IMAP_PASSWORD"), "{err}");
    let mut command = env.command();
    let output = command
        .arg("check")
        .env("TP_IMAP_PASSWORD", PASSWORD)
        .output()
        .expect("check");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}");
    assert!(
        out.contains(&format!(
            "replies.imap: watches \"INBOX\" at 127.0.0.1:{port} (no TLS) as \"replies\"; marks each processed mail seen"
        )),
        "{out}"
    );
    assert!(!out.contains(PASSWORD), "{out}");

    let text = std::fs::read_to_string(&env.config_path).expect("config");
    let line = text
        .lines()
        .position(|l| l.starts_with("username = "))
        .expect("username line")
        + 1;
    std::fs::write(&env.config_path, text.replace("username = ", "usrname = ")).expect("config");
    let (ok, out, err) = env.run_cli(&["check"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains(&format!("touchpoint.toml:{line}")) && err.contains("usrname"),
        "the mistake is named with its file and line:\n{err}"
    );

    std::fs::write(
        &env.config_path,
        text.replace("tls = \"none\"", "tls = \"none\"\nafter = \"move\""),
    )
    .expect("config");
    let (ok, _, err) = env.run_cli(&["check"]);
    assert!(!ok && err.contains("replies.imap.move_to"), "{err}");
}

/// A server without IDLE and without MOVE: the watcher polls every `poll_every`, and moves
/// with COPY, a \Deleted flag and UID EXPUNGE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_idle_or_move_is_polled() {
    let dovecot = std::sync::Arc::new(Dovecot::start_with(
        false,
        "imap_capability = IMAP4rev1 LITERAL+ UIDPLUS\n",
    ));
    let config = replies_config(dovecot.port, "after = \"move\"\nmove_to = \"Archive\"\n")
        .replace("poll_every = \"20s\"", "poll_every = \"1s\"");
    let world = World::new(Backend::Sqlite, &config, &["ada"]).await;
    let daemon = world.daemon(PASSWORD);
    daemon.ready().await;
    let ada = world.sent("ada", &daemon).await;
    let reply = mail(
        "ada@example.com",
        &reply_to(&ada),
        "ada-poll@example.com",
        "",
        "Polled.\r\n",
    );
    let d = dovecot.clone();
    blocking(move || d.deliver(&reply)).await;
    world.wait_events("ada", "replied", 1, &daemon).await;
    let d = dovecot.clone();
    blocking(move || {
        d.wait_for_counts("INBOX", (0, 0));
        d.wait_for_counts("Archive", (1, 0));
    })
    .await;
    let log = daemon.log();
    assert!(log.contains("waiting for mail (polling)"), "{log}");
    let metrics = support::http::get(daemon.http, "/metrics", &[]).await;
    let metrics = String::from_utf8_lossy(&metrics.body).to_string();
    assert!(
        metrics.contains("\ntouchpoint_replies_imap_up 1\n"),
        "{metrics}"
    );
    daemon.stop().await;
}

/// STARTTLS on the plain port, with the same private CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_a_private_ca() {
    let dovecot = std::sync::Arc::new(Dovecot::start(true));
    let ca: PathBuf = dovecot.path().join("ca.pem");
    let config = format!(
        "[replies]\naddress = \"replies@acme.example\"\n\n[replies.imap]\nhost = \"localhost\"\n\
         port = {}\ntls = \"starttls\"\nca_file = \"{}\"\nusername = \"{USER}\"\n\
         password_env = \"TP_IMAP_PASSWORD\"\ntimeout = \"5s\"\n",
        dovecot.port,
        ca.display()
    );
    let world = World::new(Backend::Sqlite, &config, &["ada"]).await;
    let daemon = world.daemon(PASSWORD);
    daemon.ready().await;
    let ada = world.sent("ada", &daemon).await;
    let reply = mail(
        "ada@example.com",
        &reply_to(&ada),
        "ada-starttls@example.com",
        "",
        "After STARTTLS.\r\n",
    );
    let d = dovecot.clone();
    blocking(move || d.deliver(&reply)).await;
    world.wait_events("ada", "replied", 1, &daemon).await;
    let log = daemon.log();
    assert!(log.contains("(STARTTLS) as \"replies\""), "{log}");
    let server = dovecot.logs();
    assert!(
        server
            .lines()
            .any(|l| l.contains("Login: user=<replies>") && l.contains(", TLS")),
        "Dovecot saw the login over TLS:\n{server}"
    );
    daemon.stop().await;
}
