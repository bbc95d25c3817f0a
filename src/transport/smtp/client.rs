//! A small SMTP client session (RFC 5321), with PIPELINING (RFC 2920) when the server offers
//! it: MAIL FROM, RCPT TO and DATA go out in one write and their three replies are read in
//! order; without it, one command at a time. The body goes out only when the caller asks,
//! after DATA's 354, so the transport can record "the body is about to go out" in between.
//! With PIPELINING the next message's envelope may follow the final dot in the same write
//! (RFC 2920 section 3.1); the dot's reply is read first, so what is known about the message
//! that was sent does not change, and the next message's replies are read by its own sender.
//!
//! Every read and write has a deadline; a session that missed one, lost its connection or is
//! in the middle of the DATA phase is never reused and is closed without QUIT (a server
//! reading message text would take QUIT as text and never answer).

use std::io;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

use super::data;
use super::reply::{MAX_LINE, Reply, ReplyBuilder};
use super::stream::Stream;
use crate::settings::Secret;
use crate::transport::OutgoingEmail;
use crate::transport::settings::TlsMode;

/// Why no usable reply came.
#[derive(Debug, thiserror::Error)]
pub(super) enum WireError {
    #[error("incomplete response: the server closed the connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the server's reply cannot be read: {0}")]
    Malformed(String),
}

/// The command a failure belongs to. `Body` is the message text and the final dot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    Mail,
    Rcpt,
    Data,
    Body,
}

/// Why a step of the mail transaction did not succeed.
#[derive(Debug)]
pub(super) enum Failure {
    /// The server answered, but not with what lets the transaction go on.
    Refused { stage: Stage, reply: Reply },
    /// No (usable) answer: the connection broke, the server went quiet or spoke nonsense.
    Lost { stage: Stage, error: WireError },
}

/// What the server said it can do, from its EHLO reply.
#[derive(Debug, Default, Clone)]
pub(super) struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit_mime: bool,
    pub smtp_utf8: bool,
    /// AUTH mechanisms, upper case.
    pub auth: Vec<String>,
}

impl Extensions {
    fn from_ehlo(reply: &Reply) -> Extensions {
        let mut found = Extensions::default();
        // The first line is the server's name, the rest one extension each.
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split([' ', '=']);
            let keyword = words.next().unwrap_or_default().to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => found.pipelining = true,
                "STARTTLS" => found.starttls = true,
                "8BITMIME" => found.eight_bit_mime = true,
                "SMTPUTF8" => found.smtp_utf8 = true,
                "AUTH" => found
                    .auth
                    .extend(words.filter(|w| !w.is_empty()).map(str::to_ascii_uppercase)),
                _ => {}
            }
        }
        found
    }
}

/// The sender and recipient of one message, as the envelope commands need them.
#[derive(Debug, Clone)]
pub(super) struct Envelope {
    from: String,
    to: String,
    /// The body is not plain ASCII: say BODY=8BITMIME where the server offers it.
    eight_bit: bool,
}

impl Envelope {
    pub fn of(email: &OutgoingEmail) -> Envelope {
        Envelope {
            from: email.envelope_from.to_string(),
            to: email.to.to_string(),
            eight_bit: !email.bytes.is_ascii(),
        }
    }
}

/// Where and how to open a session.
pub(super) struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: TlsMode,
    /// Needed for `TlsMode::Tls` and `TlsMode::Starttls`.
    pub connector: Option<&'a TlsConnector>,
    /// The name given in EHLO.
    pub hello: &'a str,
    pub login: Option<(&'a str, &'a Secret)>,
    /// The deadline of each read and write.
    pub step: Duration,
}

pub(super) struct Session {
    stream: Stream,
    /// Received and not yet parsed.
    input: Vec<u8>,
    extensions: Extensions,
    step: Duration,
    /// A read or write failed or missed its deadline: the conversation is out of step.
    broken: bool,
    /// The server answered 354 and is reading message text until the final dot.
    in_data: bool,
    /// The next message's envelope followed the final dot; its replies are not read yet.
    envelope_unread: bool,
}

impl Session {
    /// Connects, reads the greeting, says EHLO, and does STARTTLS and AUTH when configured.
    /// The error is the reason the relay cannot be used, in words.
    pub async fn open(target: &Target<'_>) -> Result<Session, String> {
        let step = target.step;
        let tcp = timeout(step, TcpStream::connect((target.host, target.port)))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        // The commands, the body and the final dot are each one write; Nagle would hold
        // them back waiting for the server's ACK.
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut stream = Stream::Plain(tcp);
        if target.tls == TlsMode::Tls {
            stream = upgrade(stream, target).await?;
        }
        let mut session = Session {
            stream,
            input: Vec::new(),
            extensions: Extensions::default(),
            step,
            broken: false,
            in_data: false,
            envelope_unread: false,
        };
        session.greeting().await?;
        session.ehlo(target.hello).await?;
        if target.tls == TlsMode::Starttls {
            session.starttls(target).await?;
        }
        if let Some((user, password)) = target.login {
            session.login(user, password).await?;
        }
        Ok(session)
    }

    /// Whether the commands of a transaction go out in one write.
    pub fn pipelines(&self) -> bool {
        self.extensions.pipelining
    }

    /// The session can carry another message.
    pub fn reusable(&self) -> bool {
        !self.broken && !self.in_data && !self.envelope_unread
    }

    /// The next message's envelope went out after the final dot and the dot's reply came: the
    /// session belongs to that message now, which reads its replies.
    pub fn awaits_envelope_replies(&self) -> bool {
        self.envelope_unread && !self.broken
    }

    async fn greeting(&mut self) -> Result<(), String> {
        let reply = self
            .reply_within(self.step * 2)
            .await
            .map_err(|e| match e {
                WireError::TimedOut(limit) => format!("no greeting within {limit:?}"),
                other => other.to_string(),
            })?;
        if reply.code != 220 {
            return Err(reply.text());
        }
        Ok(())
    }

    async fn ehlo(&mut self, hello: &str) -> Result<(), String> {
        let reply = self.expect(&format!("EHLO {hello}\r\n"), 250).await?;
        self.extensions = Extensions::from_ehlo(&reply);
        Ok(())
    }

    async fn starttls(&mut self, target: &Target<'_>) -> Result<(), String> {
        if !self.extensions.starttls {
            return Err("STARTTLS is not supported on this server".into());
        }
        self.expect("STARTTLS\r\n", 220).await?;
        // Anything after the 220 was sent in the clear and could have been injected by a
        // man in the middle to be taken as an answer inside TLS (RFC 3207 section 4.2).
        if !self.input.is_empty() {
            return Err("the server sent data before TLS started".into());
        }
        let plain = std::mem::replace(&mut self.stream, Stream::Detached);
        self.stream = upgrade(plain, target).await?;
        // RFC 3207: forget what was learnt before TLS, ask again.
        self.ehlo(target.hello).await
    }

    async fn login(&mut self, user: &str, password: &Secret) -> Result<(), String> {
        let refused = |why: String| format!("login failed: {why}");
        if self.extensions.auth.iter().any(|m| m == "PLAIN") {
            let token = STANDARD.encode(format!("\0{user}\0{}", password.expose()));
            self.expect(&format!("AUTH PLAIN {token}\r\n"), 235)
                .await
                .map_err(refused)?;
        } else if self.extensions.auth.iter().any(|m| m == "LOGIN") {
            self.expect("AUTH LOGIN\r\n", 334).await.map_err(refused)?;
            let user = STANDARD.encode(user);
            self.expect(&format!("{user}\r\n"), 334)
                .await
                .map_err(refused)?;
            let secret = STANDARD.encode(password.expose());
            self.expect(&format!("{secret}\r\n"), 235)
                .await
                .map_err(refused)?;
        } else {
            return Err("No compatible authentication mechanism was found".into());
        }
        Ok(())
    }

    /// Sends `command`; its reply must have `code`, else the reply (or the failure) in words.
    async fn expect(&mut self, command: &str, code: u16) -> Result<Reply, String> {
        self.write(command.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let reply = self.reply().await.map_err(|e| e.to_string())?;
        if reply.code != code {
            return Err(reply.text());
        }
        Ok(reply)
    }

    /// MAIL FROM, RCPT TO and DATA, up to the server's 354.
    pub async fn envelope(&mut self, envelope: &Envelope) -> Result<(), Failure> {
        let commands = self.commands(envelope);
        if self.pipelines() {
            self.envelope_pipelined(&commands).await
        } else {
            self.envelope_one_by_one(&commands).await
        }
    }

    fn commands(&self, envelope: &Envelope) -> [String; 3] {
        [
            self.mail_command(envelope),
            format!("RCPT TO:<{}>\r\n", envelope.to),
            "DATA\r\n".to_string(),
        ]
    }

    fn mail_command(&self, envelope: &Envelope) -> String {
        let mut command = format!("MAIL FROM:<{}>", envelope.from);
        if envelope.eight_bit && self.extensions.eight_bit_mime {
            command.push_str(" BODY=8BITMIME");
        }
        let ascii = envelope.from.is_ascii() && envelope.to.is_ascii();
        if !ascii && self.extensions.smtp_utf8 {
            command.push_str(" SMTPUTF8");
        }
        command.push_str("\r\n");
        command
    }

    /// All three commands in one write, then their replies in order (RFC 2920 section 3.1).
    async fn envelope_pipelined(&mut self, commands: &[String; 3]) -> Result<(), Failure> {
        let batch = commands.concat();
        self.write(batch.as_bytes())
            .await
            .map_err(|error| Failure::Lost {
                stage: Stage::Mail,
                error,
            })?;
        self.envelope_replies().await
    }

    /// The replies to a pipelined envelope, in order. The first refusal is the answer; the
    /// replies after it are still read, to learn whether DATA was accepted (then the server
    /// waits for text and the session is spent).
    pub async fn envelope_replies(&mut self) -> Result<(), Failure> {
        self.envelope_unread = false;
        let mut refusal = None;
        for stage in [Stage::Mail, Stage::Rcpt, Stage::Data] {
            match self.envelope_reply(stage).await {
                Ok(()) => {}
                Err(failure @ Failure::Refused { .. }) => {
                    refusal.get_or_insert(failure);
                }
                Err(lost) => return Err(refusal.unwrap_or(lost)),
            }
        }
        refusal.map_or(Ok(()), Err)
    }

    async fn envelope_one_by_one(&mut self, commands: &[String; 3]) -> Result<(), Failure> {
        for (stage, command) in [Stage::Mail, Stage::Rcpt, Stage::Data]
            .into_iter()
            .zip(commands)
        {
            self.write(command.as_bytes())
                .await
                .map_err(|error| Failure::Lost { stage, error })?;
            self.envelope_reply(stage).await?;
        }
        Ok(())
    }

    /// Reads the reply to one envelope command: 2xx for MAIL and RCPT, 354 for DATA.
    async fn envelope_reply(&mut self, stage: Stage) -> Result<(), Failure> {
        let reply = self
            .reply()
            .await
            .map_err(|error| Failure::Lost { stage, error })?;
        let wanted = match stage {
            Stage::Data => reply.code == 354,
            _ => reply.is_success(),
        };
        if stage == Stage::Data && reply.code == 354 {
            self.in_data = true;
        }
        if wanted {
            Ok(())
        } else {
            Err(Failure::Refused { stage, reply })
        }
    }

    /// Sends the message text and the final dot, and reads the final reply, all within the
    /// step deadline. If the server is found gone before the first byte, that is a failure at
    /// DATA: nothing of the message left this host. With PIPELINING, `next`'s envelope follows
    /// the dot in the same write; its replies are left for [`Session::envelope_replies`].
    pub async fn body(
        &mut self,
        message: &[u8],
        next: Option<&Envelope>,
    ) -> Result<Reply, Failure> {
        if let Some(error) = self.gone() {
            self.broken = true;
            return Err(Failure::Lost {
                stage: Stage::Data,
                error,
            });
        }
        let mut wire = data::encode(message);
        let next = next.filter(|_| self.pipelines());
        if let Some(envelope) = next {
            wire.extend(self.commands(envelope).concat().into_bytes());
        }
        let limit = self.step;
        let sent = timeout(limit, async {
            self.stream.write_all(&wire).await?;
            self.read_reply().await
        })
        .await;
        let lost = |error| Failure::Lost {
            stage: Stage::Body,
            error,
        };
        let reply = match sent {
            Err(_elapsed) => Err(lost(WireError::TimedOut(limit))),
            Ok(Err(error)) => Err(lost(error)),
            Ok(Ok(reply)) => Ok(reply),
        }
        .inspect_err(|_| self.broken = true)?;
        self.in_data = false;
        self.envelope_unread = next.is_some();
        if reply.is_success() {
            Ok(reply)
        } else {
            Err(Failure::Refused {
                stage: Stage::Body,
                reply,
            })
        }
    }

    /// After 354 the server has nothing to say until the final dot: if it closed the
    /// connection, or said something anyway, it is not taking a message on this session.
    fn gone(&mut self) -> Option<WireError> {
        if !self.input.is_empty() {
            return Some(WireError::Malformed(
                "the server spoke before the message text was sent".into(),
            ));
        }
        let mut buf = [0u8; 512];
        match self.stream.read_ready(&mut buf)? {
            Ok(0) => Some(WireError::Closed),
            Ok(n) => {
                self.input.extend_from_slice(&buf[..n]);
                Some(WireError::Malformed(format!(
                    "the server spoke before the message text was sent: {:?}",
                    String::from_utf8_lossy(&buf[..n.min(80)])
                )))
            }
            Err(error) => Some(WireError::Io(error)),
        }
    }

    /// Ends the session: QUIT when the conversation is in step, otherwise just the close.
    pub async fn close(mut self, patience: Duration) {
        if !self.reusable() {
            return;
        }
        let quit = async {
            if self.write(b"QUIT\r\n").await.is_ok() {
                let _ = self.reply().await;
            }
            self.stream.shutdown().await;
        };
        let _ = timeout(patience, quit).await;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        let result = match timeout(self.step, self.stream.write_all(bytes)).await {
            Err(_elapsed) => Err(WireError::TimedOut(self.step)),
            Ok(result) => result.map_err(WireError::Io),
        };
        self.broken |= result.is_err();
        result
    }

    async fn reply(&mut self) -> Result<Reply, WireError> {
        self.reply_within(self.step).await
    }

    async fn reply_within(&mut self, limit: Duration) -> Result<Reply, WireError> {
        let result = match timeout(limit, self.read_reply()).await {
            Err(_elapsed) => Err(WireError::TimedOut(limit)),
            Ok(result) => result,
        };
        self.broken |= result.is_err();
        result
    }

    async fn read_reply(&mut self) -> Result<Reply, WireError> {
        let mut builder = ReplyBuilder::default();
        loop {
            let line = self.read_line().await?;
            if let Some(reply) = builder.push(&line).map_err(WireError::Malformed)? {
                return Ok(reply);
            }
        }
    }

    /// One line without its CRLF (or bare LF).
    async fn read_line(&mut self) -> Result<Vec<u8>, WireError> {
        loop {
            if let Some(end) = self.input.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.input.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.input.len() > MAX_LINE {
                return Err(WireError::Malformed("a reply line is too long".into()));
            }
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(WireError::Closed);
            }
            self.input.extend_from_slice(&chunk[..read]);
        }
    }
}

/// Wraps `stream` in TLS within the step deadline.
async fn upgrade(stream: Stream, target: &Target<'_>) -> Result<Stream, String> {
    let connector = target
        .connector
        .ok_or("TLS is configured but cannot be set up")?;
    timeout(target.step, stream.into_tls(connector, target.host))
        .await
        .map_err(|_| format!("no TLS handshake within {:?}", target.step))?
        .map_err(|e| format!("TLS failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_read_from_the_ehlo_reply() {
        let reply = Reply {
            code: 250,
            lines: vec![
                "mx.example ESMTP".into(),
                "pipelining".into(),
                "SIZE 10240000".into(),
                "AUTH PLAIN login".into(),
                "8BITMIME".into(),
                "STARTTLS".into(),
            ],
        };
        let found = Extensions::from_ehlo(&reply);
        assert!(found.pipelining && found.starttls && found.eight_bit_mime);
        assert!(!found.smtp_utf8);
        assert_eq!(found.auth, ["PLAIN", "LOGIN"]);
        // The server's name is not an extension, even when it looks like one.
        let name_only = Reply {
            code: 250,
            lines: vec!["PIPELINING".into()],
        };
        assert!(!Extensions::from_ehlo(&name_only).pipelining);
    }
}
