//! The file transport: each message becomes `<dir>/<message-id>.eml`, written to a temporary
//! name and renamed into place, so a reader never sees half a message.

use std::future::Future;
use std::path::PathBuf;

use super::{OutgoingEmail, SendError};

#[derive(Debug)]
pub struct FileTransport {
    dir: PathBuf,
}

impl FileTransport {
    pub fn new(dir: PathBuf) -> Result<FileTransport, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create transport.file.dir {}: {e}", dir.display()))?;
        Ok(FileTransport { dir })
    }

    pub async fn deliver<F, Fut>(
        &self,
        email: &OutgoingEmail,
        before_body: F,
    ) -> Result<String, SendError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = bool>,
    {
        let name: String = email
            .message_id
            .trim_matches(['<', '>'])
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.@".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.dir.join(format!("{name}.eml"));
        let partial = self.dir.join(format!(".{name}.eml.partial"));
        tokio::fs::write(&partial, &email.bytes)
            .await
            .map_err(|e| {
                SendError::RelayUnavailable(format!("cannot write {}: {e}", partial.display()))
            })?;
        if !before_body().await {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(SendError::Withdrawn);
        }
        tokio::fs::rename(&partial, &path).await.map_err(|e| {
            SendError::Ambiguous(format!("cannot rename into {}: {e}", path.display()))
        })?;
        Ok(format!("written to {}", path.display()))
    }
}
