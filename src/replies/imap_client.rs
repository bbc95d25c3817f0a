//! A small IMAP4rev1 client: just what watching one mailbox takes (LOGIN, SELECT, UID SEARCH,
//! UID FETCH BODY.PEEK[], UID STORE, UID MOVE or COPY + EXPUNGE, CREATE, IDLE). Written here
//! rather than taken from async-imap, which would bring a second base64 and thiserror, nom and
//! a newer minimum Rust; TLS is the rustls stack the SMTP transport already uses.

use std::time::Duration;

use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio::net::TcpStream;

use super::imap::ImapSettings;
use crate::transport::settings::TlsMode;

/// The longest line or literal we accept; a reply mail bigger than this is not a reply.
const MAX_LITERAL: usize = 50 * 1024 * 1024;
const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, std::io::Error),
    #[error("the connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The server refused the username or password.
    #[error("login refused: {0}")]
    Login(String),
    #[error("the server refused {command}: {answer}")]
    Refused { command: String, answer: String },
    #[error("the server's answer makes no sense: {0}")]
    Protocol(String),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One untagged response: its text (literals replaced by `{n}`) and its literals in order.
#[derive(Debug, Default)]
pub struct Response {
    pub text: String,
    pub literals: Vec<Vec<u8>>,
}

/// What woke an IDLE.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// The mailbox changed (EXISTS or RECENT).
    NewMail,
    /// The interval passed with no news.
    Quiet,
}

/// A logged-in connection.
pub struct Session {
    stream: BufReader<Box<dyn Io>>,
    next_tag: u32,
    timeout: Duration,
    capabilities: Vec<String>,
}

impl Session {
    /// Connects, does TLS as configured, reads the greeting and logs in.
    pub async fn connect(settings: &ImapSettings) -> Result<Session, ImapError> {
        let address = format!("{}:{}", settings.host, settings.port);
        let tcp = tokio::time::timeout(settings.timeout, TcpStream::connect(&address))
            .await
            .map_err(|_| ImapError::Timeout(settings.timeout))?
            .map_err(|e| ImapError::Connect(address.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match (settings.tls_mode, &settings.tls) {
            (TlsMode::Tls, Some(tls)) => Box::new(tls_wrap(tcp, settings, tls.clone()).await?),
            _ => Box::new(tcp),
        };
        let mut session = Session {
            stream: BufReader::new(stream),
            next_tag: 1,
            timeout: settings.timeout,
            capabilities: Vec::new(),
        };
        session.greeting().await?;
        if let (TlsMode::Starttls, Some(tls)) = (settings.tls_mode, &settings.tls) {
            session.starttls(settings, tls.clone()).await?;
        }
        session
            .login(&settings.username, settings.password.expose())
            .await?;
        session.refresh_capabilities().await?;
        Ok(session)
    }

    async fn greeting(&mut self) -> Result<(), ImapError> {
        let line = self.read_line().await?;
        if line.starts_with("* OK") || line.starts_with("* PREAUTH") {
            Ok(())
        } else {
            Err(ImapError::Protocol(format!("greeting {line:?}")))
        }
    }

    async fn starttls(
        &mut self,
        settings: &ImapSettings,
        tls: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
    ) -> Result<(), ImapError> {
        self.command("STARTTLS").await?;
        if !self.stream.buffer().is_empty() {
            return Err(ImapError::Protocol("data after the STARTTLS answer".into()));
        }
        let placeholder: Box<dyn Io> = Box::new(tokio::io::duplex(1).0);
        let plain = std::mem::replace(&mut self.stream, BufReader::new(placeholder)).into_inner();
        let wrapped = tls_wrap(plain, settings, tls).await?;
        self.stream = BufReader::new(Box::new(wrapped));
        Ok(())
    }

    async fn login(&mut self, username: &str, password: &str) -> Result<(), ImapError> {
        let (user, pass) = match (quoted(username), quoted(password)) {
            (Some(user), Some(pass)) => (user, pass),
            _ => {
                return Err(ImapError::Login(
                    "the username or password has a line break in it".into(),
                ));
            }
        };
        // Not through `command`: its errors quote the command, and this one holds the password.
        let tag = self.send(&format!("LOGIN {user} {pass}")).await?;
        let (_, done) = self.responses(&tag).await?;
        match status_of(&done) {
            Some("OK") => Ok(()),
            _ => Err(ImapError::Login(answer_text(&done, &tag))),
        }
    }

    async fn refresh_capabilities(&mut self) -> Result<(), ImapError> {
        let responses = self.command("CAPABILITY").await?;
        self.capabilities = responses
            .iter()
            .filter_map(|r| r.text.strip_prefix("* CAPABILITY "))
            .flat_map(|t| t.split_whitespace().map(str::to_ascii_uppercase))
            .collect();
        Ok(())
    }

    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    pub async fn select(&mut self, mailbox: &str) -> Result<(), ImapError> {
        self.command(&format!("SELECT {}", quote_name(mailbox)))
            .await
            .map(drop)
    }

    /// Creates `folder` unless it exists.
    pub async fn ensure_folder(&mut self, folder: &str) -> Result<(), ImapError> {
        let listed = self
            .command(&format!("LIST \"\" {}", quote_name(folder)))
            .await?;
        if listed.iter().any(|r| r.text.starts_with("* LIST ")) {
            return Ok(());
        }
        self.command(&format!("CREATE {}", quote_name(folder)))
            .await
            .map(drop)
    }

    /// UIDs of the mail not yet seen, oldest first.
    pub async fn unseen(&mut self) -> Result<Vec<u32>, ImapError> {
        let responses = self.command("UID SEARCH UNSEEN").await?;
        let mut uids: Vec<u32> = responses
            .iter()
            .filter_map(|r| r.text.strip_prefix("* SEARCH"))
            .flat_map(|t| t.split_whitespace().filter_map(|n| n.parse().ok()))
            .collect();
        uids.sort_unstable();
        Ok(uids)
    }

    /// The whole mail, without setting `\Seen`; `None` when it is gone (expunged meanwhile).
    pub async fn fetch(&mut self, uid: u32) -> Result<Option<Vec<u8>>, ImapError> {
        let responses = self
            .command(&format!("UID FETCH {uid} BODY.PEEK[]"))
            .await?;
        Ok(responses
            .into_iter()
            .filter(|r| r.text.contains(" FETCH ") && r.text.contains("BODY[]"))
            .find_map(|r| r.literals.into_iter().next()))
    }

    pub async fn mark_seen(&mut self, uid: u32) -> Result<(), ImapError> {
        self.command(&format!("UID STORE {uid} +FLAGS.SILENT (\\Seen)"))
            .await
            .map(drop)
    }

    /// Moves one mail: UID MOVE where offered, else COPY, flag deleted, expunge.
    pub async fn move_to(&mut self, uid: u32, folder: &str) -> Result<(), ImapError> {
        let folder = quote_name(folder);
        if self.has("MOVE") {
            return self
                .command(&format!("UID MOVE {uid} {folder}"))
                .await
                .map(drop);
        }
        self.command(&format!("UID COPY {uid} {folder}")).await?;
        self.command(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)"))
            .await?;
        // Without UIDPLUS, EXPUNGE also removes what others flagged deleted in this mailbox.
        let expunge = if self.has("UIDPLUS") {
            format!("UID EXPUNGE {uid}")
        } else {
            "EXPUNGE".to_string()
        };
        self.command(&expunge).await.map(drop)
    }

    /// Waits up to `wait` for the mailbox to change, with IDLE.
    pub async fn idle(&mut self, wait: Duration) -> Result<Woken, ImapError> {
        let tag = self.send("IDLE").await?;
        // Untagged news may come before the continuation.
        let mut early = false;
        loop {
            let line = self.read_line().await?;
            if line.starts_with('+') {
                break;
            }
            if line.starts_with(&format!("{tag} ")) {
                return Err(ImapError::Refused {
                    command: "IDLE".into(),
                    answer: answer_text(&line, &tag),
                });
            }
            early |= is_news(&line);
        }
        let woken = if early {
            Woken::NewMail
        } else {
            match tokio::time::timeout(wait, self.until_news()).await {
                Ok(result) => result?,
                Err(_) => Woken::Quiet,
            }
        };
        self.write(b"DONE\r\n").await?;
        let (_, done) = self.responses(&tag).await?;
        match status_of(&done) {
            Some("OK") => Ok(woken),
            _ => Err(ImapError::Refused {
                command: "IDLE".into(),
                answer: answer_text(&done, &tag),
            }),
        }
    }

    /// Reads untagged lines in IDLE until one says the mailbox has new mail; keep-alives
    /// (`* OK Still here`) and flag changes are not news.
    async fn until_news(&mut self) -> Result<Woken, ImapError> {
        loop {
            let line = self.read_line_unbounded().await?;
            if is_news(&line) {
                return Ok(Woken::NewMail);
            }
            if line.to_ascii_uppercase().starts_with("* BYE") {
                return Err(ImapError::Closed);
            }
        }
    }

    /// Sends `command` and reads to its tagged answer; the untagged responses on OK.
    async fn command(&mut self, command: &str) -> Result<Vec<Response>, ImapError> {
        let tag = self.send(command).await?;
        let (responses, done) = self.responses(&tag).await?;
        match status_of(&done) {
            Some("OK") => Ok(responses),
            _ => Err(ImapError::Refused {
                command: command.split(' ').take(2).collect::<Vec<_>>().join(" "),
                answer: answer_text(&done, &tag),
            }),
        }
    }

    async fn send(&mut self, command: &str) -> Result<String, ImapError> {
        let tag = format!("t{}", self.next_tag);
        self.next_tag += 1;
        self.write(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        Ok(tag)
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ImapError> {
        let writing = async {
            let stream = self.stream.get_mut();
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        tokio::time::timeout(self.timeout, writing)
            .await
            .map_err(|_| ImapError::Timeout(self.timeout))?
            .map_err(ImapError::Io)
    }

    /// Untagged responses up to the line tagged `tag`, and that line.
    async fn responses(&mut self, tag: &str) -> Result<(Vec<Response>, String), ImapError> {
        let prefix = format!("{tag} ");
        let mut responses = Vec::new();
        loop {
            let response = self.read_response().await?;
            if response.text.starts_with(&prefix) {
                return Ok((responses, response.text));
            }
            if response.text.starts_with("* BYE") {
                return Err(ImapError::Closed);
            }
            responses.push(response);
        }
    }

    /// One response: a line, and while it ends in a literal `{n}`, the literal and the rest.
    async fn read_response(&mut self) -> Result<Response, ImapError> {
        let mut response = Response::default();
        loop {
            let line = self.read_line().await?;
            let size = literal_size(&line);
            response.text.push_str(&line);
            let Some(size) = size else {
                return Ok(response);
            };
            if size > MAX_LITERAL {
                return Err(ImapError::Protocol(format!("a literal of {size} bytes")));
            }
            let mut literal = vec![0; size];
            tokio::time::timeout(self.timeout, self.stream.read_exact(&mut literal))
                .await
                .map_err(|_| ImapError::Timeout(self.timeout))??;
            response.literals.push(literal);
        }
    }

    async fn read_line(&mut self) -> Result<String, ImapError> {
        tokio::time::timeout(self.timeout, self.read_line_unbounded())
            .await
            .map_err(|_| ImapError::Timeout(self.timeout))?
    }

    async fn read_line_unbounded(&mut self) -> Result<String, ImapError> {
        let mut line = Vec::new();
        let read = (&mut self.stream)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if read == 0 {
            return Err(ImapError::Closed);
        }
        if !line.ends_with(b"\n") {
            return Err(ImapError::Protocol("a line too long or cut off".into()));
        }
        let text = String::from_utf8_lossy(&line);
        Ok(text.trim_end_matches(['\r', '\n']).to_string())
    }
}

async fn tls_wrap<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    settings: &ImapSettings,
    tls: std::sync::Arc<tokio_rustls::rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<S>, ImapError> {
    use tokio_rustls::rustls::pki_types::ServerName;
    let name = ServerName::try_from(settings.host.clone())
        .map_err(|e| ImapError::Tls(settings.host.clone(), std::io::Error::other(e.to_string())))?;
    let connecting = tokio_rustls::TlsConnector::from(tls).connect(name, stream);
    tokio::time::timeout(settings.timeout, connecting)
        .await
        .map_err(|_| ImapError::Timeout(settings.timeout))?
        .map_err(|e| ImapError::Tls(settings.host.clone(), e))
}

/// `* 4 EXISTS` or `* 1 RECENT`: the mailbox has more mail.
fn is_news(line: &str) -> bool {
    let upper = line.to_ascii_uppercase();
    upper.starts_with("* ") && (upper.ends_with(" EXISTS") || upper.ends_with(" RECENT"))
}

/// `{123}` or `{123+}` at the end of a line.
fn literal_size(line: &str) -> Option<usize> {
    let inner = line.strip_suffix('}')?;
    let open = inner.rfind('{')?;
    inner[open + 1..].trim_end_matches('+').parse().ok()
}

/// `OK`, `NO` or `BAD` of a tagged line.
fn status_of(line: &str) -> Option<&str> {
    line.split_whitespace().nth(1)
}

/// The server's words after the tag, for error messages.
fn answer_text(line: &str, tag: &str) -> String {
    line.strip_prefix(tag).unwrap_or(line).trim().to_string()
}

/// An IMAP quoted string, or `None` if `text` cannot be one (line breaks).
fn quoted(text: &str) -> Option<String> {
    if text.contains(['\r', '\n']) {
        return None;
    }
    Some(format!(
        "\"{}\"",
        text.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// A mailbox name as a quoted string (config validation keeps line breaks out).
fn quote_name(name: &str) -> String {
    quoted(name).unwrap_or_else(|| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_and_quoting() {
        assert_eq!(literal_size("* 1 FETCH (UID 7 BODY[] {1234}"), Some(1234));
        assert_eq!(literal_size("* 1 FETCH (UID 7 BODY[] {12+}"), Some(12));
        assert_eq!(literal_size("* OK {not}"), None);
        assert_eq!(literal_size("* 3 EXISTS"), None);
        assert_eq!(quoted("a\"b\\c").unwrap(), "\"a\\\"b\\\\c\"");
        assert_eq!(quoted("a\r\nb"), None);
        assert_eq!(status_of("t3 NO [AUTHENTICATIONFAILED] no"), Some("NO"));
        assert!(is_news("* 4 EXISTS") && is_news("* 1 recent"));
        assert!(!is_news("* OK Still here") && !is_news("* 3 FETCH (FLAGS (\\Seen))"));
    }
}
