//! The socket under the SMTP client: plain TCP or rustls over it (implicit TLS, or STARTTLS
//! after the server agreed). The TLS setup is lettre's: rustls with ring and the webpki roots.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// While the socket is being wrapped in TLS; a failed upgrade leaves it so.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the connection was given up")
}

/// The client side of TLS for every connection: the webpki roots, plus `extra_roots` (a
/// private relay's own CA).
pub(super) fn connector(extra_roots: &[CertificateDer<'static>]) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for root in extra_roots {
        roots
            .add(root.clone())
            .map_err(|e| format!("a root certificate cannot be used: {e}"))?;
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS cannot be set up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

impl Stream {
    /// Wraps the connection in TLS, checking the certificate against `host`.
    pub async fn into_tls(self, tls: &TlsConnector, host: &str) -> io::Result<Stream> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match self {
            Stream::Plain(tcp) => Ok(Stream::Tls(Box::new(tls.connect(name, tcp).await?))),
            Stream::Tls(_) => Err(io::Error::other("the connection is already encrypted")),
            Stream::Detached => Err(detached()),
        }
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use tokio::io::AsyncReadExt;
        match self {
            Stream::Plain(tcp) => tcp.read(buf).await,
            Stream::Tls(tls) => tls.read(buf).await,
            Stream::Detached => Err(detached()),
        }
    }

    /// Writes all of `bytes` and flushes them: with TLS, rustls holds them until the flush.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Plain(tcp) => tcp.write_all(bytes).await,
            Stream::Tls(tls) => {
                tls.write_all(bytes).await?;
                tls.flush().await
            }
            Stream::Detached => Err(detached()),
        }
    }

    /// Reads what has already arrived, without waiting: `None` when nothing has (the server is
    /// quiet), `Some(Ok(0))` at end of stream. With TLS, records that carry no data (a session
    /// ticket) are taken in and count as quiet.
    pub fn read_ready(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        let mut read = ReadBuf::new(buf);
        let polled = match self {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(&mut context, &mut read),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(&mut context, &mut read),
            Stream::Detached => Poll::Ready(Err(detached())),
        };
        match polled {
            Poll::Pending => None,
            Poll::Ready(result) => Some(result.map(|()| read.filled().len())),
        }
    }

    /// Ends the conversation: TLS close_notify, then the write side of the socket.
    pub async fn shutdown(&mut self) {
        let _ = match self {
            Stream::Plain(tcp) => tcp.shutdown().await,
            Stream::Tls(tls) => tls.shutdown().await,
            Stream::Detached => Ok(()),
        };
    }
}
