//! Encryption at rest with age (docs/encryption.md): the recipients an export is encrypted to
//! (X25519 public keys, `age1…`), the identities that decrypt it (`AGE-SECRET-KEY-1…`), and the
//! streams that do both. age encrypts in 64 KiB chunks, so memory stays flat whatever the size.
//! Keys never appear in an error, a log or a `Debug` rendering: messages name where a key came
//! from and its line, never the key.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use age::x25519;
use age_core::format::{FileKey, Stanza};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

use super::Error;

/// The first bytes of a binary age file.
const BINARY_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// The first line of an armored (PEM-like) age file.
const ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";

/// The public keys an export is encrypted to; any one of their identities decrypts it.
#[derive(Clone, Default)]
pub struct Recipients {
    keys: Vec<x25519::Recipient>,
}

/// The secret keys an import tries, in order, on an encrypted file.
#[derive(Clone, Default)]
pub struct Identities {
    keys: Arc<Vec<x25519::Identity>>,
}

/// A key's text, told apart without saying it.
enum KeyKind {
    Public,
    Secret,
    Other,
}

fn kind_of(line: &str) -> KeyKind {
    if line.len() > 4 && line[..4].eq_ignore_ascii_case("age1") {
        KeyKind::Public
    } else if line.len() > 16 && line[..16].eq_ignore_ascii_case("AGE-SECRET-KEY-1") {
        KeyKind::Secret
    } else {
        KeyKind::Other
    }
}

/// The lines of a key file that hold keys: blank lines and `#` comments are skipped.
fn key_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
}

fn invalid(origin: &str, line: Option<usize>, problem: &'static str) -> Error {
    Error::InvalidEncryptionKey {
        origin: origin.to_owned(),
        line,
        problem,
    }
}

impl Recipients {
    /// Parses recipients: one `age1…` public key a line, `#` comments and blank lines allowed
    /// (the recipients file format of `age -R`). `origin` names where the text came from in
    /// messages ("--encrypt-to", "file keys.txt", "Secret \"backup-keys\" key \"recipients\"").
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for (number, line) in key_lines(text) {
            let problem = match kind_of(line) {
                KeyKind::Public => match x25519::Recipient::from_str(line) {
                    Ok(key) => {
                        keys.push(key);
                        continue;
                    }
                    Err(_) => {
                        "is not a valid age public key (it starts with age1 but does not decode)"
                    }
                },
                KeyKind::Secret => {
                    "is an age secret key, not a public key: give the recipient (`age-keygen -y \
                     KEYFILE` prints it) and keep the secret key out of recipients"
                }
                KeyKind::Other => "is not an age X25519 public key (age1…)",
            };
            return Err(invalid(origin, Some(number), problem));
        }
        if keys.is_empty() {
            return Err(invalid(origin, None, "holds no age public key (age1…)"));
        }
        Ok(Self { keys })
    }

    /// Adds `other`'s keys after these.
    pub fn extend(&mut self, other: Recipients) {
        self.keys.extend(other.keys);
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The recipients as `age -r` prints them (public keys: not secret).
    pub fn to_strings(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.to_string()).collect()
    }
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipients({})", self.keys.len())
    }
}

impl Identities {
    /// Parses identities: the file `age-keygen` writes (one `AGE-SECRET-KEY-1…` a line, `#`
    /// comments and blank lines allowed). `origin` names where it came from in messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for (number, line) in key_lines(text) {
            let problem = match kind_of(line) {
                KeyKind::Secret => match x25519::Identity::from_str(&line.to_ascii_uppercase()) {
                    Ok(key) => {
                        keys.push(key);
                        continue;
                    }
                    Err(_) => {
                        "is not a valid age secret key (it starts with AGE-SECRET-KEY-1 but does \
                         not decode)"
                    }
                },
                KeyKind::Public => {
                    "is a public key (age1…): an identity is the secret key file that \
                     `age-keygen` writes"
                }
                KeyKind::Other => "is not an age X25519 secret key (AGE-SECRET-KEY-1…)",
            };
            return Err(invalid(origin, Some(number), problem));
        }
        if keys.is_empty() {
            return Err(invalid(
                origin,
                None,
                "holds no age secret key (AGE-SECRET-KEY-1…)",
            ));
        }
        Ok(Self {
            keys: Arc::new(keys),
        })
    }

    /// Reads and parses an identity file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, Error> {
        let origin = format!("identity file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| Error::InvalidEncryptionKey {
            origin: origin.clone(),
            line: None,
            problem: match e.kind() {
                std::io::ErrorKind::NotFound => "does not exist",
                std::io::ErrorKind::PermissionDenied => "cannot be read (permission denied)",
                std::io::ErrorKind::InvalidData => "is not UTF-8 text",
                _ => "cannot be read",
            },
        })?;
        Self::parse(&text, &origin)
    }

    /// Adds `other`'s keys after these.
    pub fn extend(&mut self, other: Identities) {
        Arc::make_mut(&mut self.keys).extend(other.keys.iter().cloned());
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The public keys of these identities: what an export to them is encrypted to.
    pub fn recipients(&self) -> Recipients {
        Recipients {
            keys: self.keys.iter().map(|k| k.to_public()).collect(),
        }
    }
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identities({})", self.keys.len())
    }
}

/// Whether these first bytes of a file are an age file's (binary or armored).
pub(crate) fn is_encrypted(head: &[u8]) -> bool {
    let trimmed = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&head[..0], |start| &head[start..]);
    head.starts_with(BINARY_MAGIC) || trimmed.starts_with(ARMOR_BEGIN)
}

// ---------------------------------------------------------------------------------------------
// Writing: age's synchronous stream encrypts into a buffer that the async writer drains.

/// Where age's stream writer puts ciphertext until it is written on.
#[derive(Clone, Default)]
struct Ciphertext(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Ciphertext {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("the encryption buffer is poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encrypts what is written to it to the recipients and writes the age file into `inner`.
/// Shutting it down writes the last chunk and shuts `inner` down.
pub(crate) struct Encrypting<W> {
    inner: W,
    stream: Option<age::stream::StreamWriter<Ciphertext>>,
    ciphertext: Ciphertext,
    /// Ciphertext taken from the buffer, written to `inner` from `written` on.
    out: Vec<u8>,
    written: usize,
}

impl<W: AsyncWrite + Unpin> Encrypting<W> {
    pub(crate) fn new(inner: W, recipients: &Recipients) -> Result<Self, Error> {
        let encryptor = age::Encryptor::with_recipients(
            recipients.keys.iter().map(|k| k as &dyn age::Recipient),
        )
        .map_err(|_| Error::InvalidExportRequest("no recipient to encrypt the export to".into()))?;
        let ciphertext = Ciphertext::default();
        let stream = encryptor
            .wrap_output(ciphertext.clone())
            .map_err(|e| Error::ExportWrite(format!("cannot start encrypting: {e}")))?;
        Ok(Self {
            inner,
            stream: Some(stream),
            ciphertext,
            out: Vec::new(),
            written: 0,
        })
    }

    pub(crate) fn into_inner(self) -> W {
        self.inner
    }

    /// Writes every byte of ciphertext produced so far into `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if self.written == self.out.len() {
                self.out.clear();
                self.written = 0;
                let mut buffered = self
                    .ciphertext
                    .0
                    .lock()
                    .map_err(|_| std::io::Error::other("the encryption buffer is poisoned"))?;
                if buffered.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                std::mem::swap(&mut *buffered, &mut self.out);
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for Encrypting<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        ready!(self.poll_drain(cx))?;
        let Some(stream) = self.stream.as_mut() else {
            return Poll::Ready(Err(std::io::Error::other("the encryption has ended")));
        };
        Poll::Ready(std::io::Write::write(stream, buf))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if let Some(stream) = self.stream.take() {
            // The last chunk, marked as last: a file cut short after it fails to decrypt.
            stream.finish()?;
        }
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// Reading: age's async decryptor, between tokio's I/O traits and the futures ones it speaks.

/// A tokio reader seen as a futures reader.
struct ToFutures<T>(T);

impl<T: AsyncRead + Unpin> futures::io::AsyncRead for ToFutures<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut read = ReadBuf::new(buf);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut read))?;
        Poll::Ready(Ok(read.filled().len()))
    }
}

impl<T: AsyncBufRead + Unpin> futures::io::AsyncBufRead for ToFutures<T> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        Pin::new(&mut self.get_mut().0).poll_fill_buf(cx)
    }

    fn consume(mut self: Pin<&mut Self>, amt: usize) {
        Pin::new(&mut self.0).consume(amt)
    }
}

/// A futures reader seen as a tokio reader.
struct ToTokio<T>(T);

impl<T: futures::io::AsyncRead + Unpin> AsyncRead for ToTokio<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = ready!(Pin::new(&mut self.0).poll_read(cx, buf.initialize_unfilled()))?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Sees the header's stanzas before any identity does, and unwraps none: how many recipients
/// the file has, and whether it was encrypted with a passphrase instead.
#[derive(Default)]
struct HeaderWitness {
    seen: Mutex<Option<(usize, bool)>>,
}

impl age::Identity for HeaderWitness {
    fn unwrap_stanza(&self, _stanza: &Stanza) -> Option<Result<FileKey, age::DecryptError>> {
        None
    }

    fn unwrap_stanzas(&self, stanzas: &[Stanza]) -> Option<Result<FileKey, age::DecryptError>> {
        let passphrase = stanzas.iter().any(|s| s.tag == "scrypt");
        // age adds a random stanza of no recipient to every header (tag `…-grease`), so that
        // implementations keep skipping stanzas they do not know.
        let recipients = stanzas
            .iter()
            .filter(|s| !s.tag.ends_with("-grease"))
            .count();
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some((recipients, passphrase));
        }
        None
    }
}

pub(crate) type DecryptedRead = Pin<Box<dyn AsyncRead + Send>>;

/// Decrypts an age file (binary or armored) that `reader` holds from its first byte with the
/// first of `identities` that is one of its recipients. Returns the plaintext and how many
/// recipients the file is encrypted to.
pub(crate) async fn decrypt<R: AsyncBufRead + Unpin + Send + 'static>(
    reader: R,
    armored: bool,
    identities: &Identities,
) -> Result<(DecryptedRead, usize), Error> {
    if armored {
        let armor = age::armor::ArmoredReader::from_async_reader(ToFutures(reader));
        let decryptor = age::Decryptor::new_async_buffered(armor)
            .await
            .map_err(header_error)?;
        let (stream, recipients) = unwrap(decryptor, identities)?;
        Ok((Box::pin(ToTokio(stream)), recipients))
    } else {
        let decryptor = age::Decryptor::new_async_buffered(ToFutures(reader))
            .await
            .map_err(header_error)?;
        let (stream, recipients) = unwrap(decryptor, identities)?;
        Ok((Box::pin(ToTokio(stream)), recipients))
    }
}

/// Finds the identity that unwraps the file key, or says why none does.
fn unwrap<R: futures::io::AsyncRead + Unpin>(
    decryptor: age::Decryptor<R>,
    identities: &Identities,
) -> Result<(age::stream::StreamReader<R>, usize), Error> {
    let witness = HeaderWitness::default();
    let tried = std::iter::once(&witness as &dyn age::Identity)
        .chain(identities.keys.iter().map(|k| k as &dyn age::Identity));
    let result = decryptor.decrypt_async(tried);
    let (recipients, passphrase) = witness
        .seen
        .lock()
        .ok()
        .and_then(|seen| *seen)
        .unwrap_or_default();
    match result {
        Ok(stream) => Ok((stream, recipients)),
        Err(_) if passphrase => Err(Error::InvalidExport(
            "it is encrypted with a passphrase; statekeeper decrypts files encrypted to age \
             public keys (age1…) with their identities"
                .into(),
        )),
        Err(age::DecryptError::NoMatchingKeys) if identities.is_empty() => {
            Err(Error::IdentityRequired { recipients })
        }
        Err(age::DecryptError::NoMatchingKeys) => Err(Error::NoMatchingIdentity {
            recipients,
            identities: identities.len(),
        }),
        Err(e) => Err(header_error(e)),
    }
}

/// A header age could not read, said without age's own text (which may quote the header).
fn header_error(error: age::DecryptError) -> Error {
    let what = match error {
        age::DecryptError::Io(e) => return Error::InvalidExport(format!("cannot read it: {e}")),
        age::DecryptError::InvalidMac => "its age header was altered (its MAC does not match)",
        age::DecryptError::UnknownFormat => "it is an age file of a version this age cannot read",
        age::DecryptError::DecryptionFailed | age::DecryptError::KeyDecryptionFailed => {
            "its age header cannot be decrypted"
        }
        _ => "its age header is corrupt",
    };
    Error::InvalidExport(what.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret;

    #[test]
    fn key_files_parse_with_comments_and_refuse_the_wrong_kind_without_quoting_it() {
        let secret = x25519::Identity::generate().to_string();
        let secret = secret.expose_secret();
        let identities =
            Identities::parse(&format!("# created: now\n\n{secret}\n"), "test").unwrap();
        assert_eq!(identities.len(), 1);
        let public = identities.recipients().to_strings().remove(0);
        let recipients =
            Recipients::parse(&format!("# ops\n{public}\n  {public}  \n"), "test").unwrap();
        assert_eq!(recipients.len(), 2);
        for error in [
            Recipients::parse(secret, "recipients").unwrap_err(),
            Identities::parse(&public, "identities").unwrap_err(),
            Identities::parse(&broken(secret), "x").unwrap_err(),
            Recipients::parse("# nothing\n", "empty").unwrap_err(),
        ] {
            let text = error.to_string();
            assert!(!text.contains(&secret[16..]), "{text}");
            assert!(!text.contains(&public[4..]), "{text}");
        }
        assert_eq!(format!("{identities:?}"), "Identities(1)");
    }

    /// The key with its last character changed: its checksum fails.
    fn broken(key: &str) -> String {
        let last = if key.ends_with('Q') { "P" } else { "Q" };
        format!("{}{last}", &key[..key.len() - 1])
    }

    #[test]
    fn age_files_are_told_by_their_first_bytes() {
        assert!(is_encrypted(b"age-encryption.org/v1\n-> X25519"));
        assert!(is_encrypted(b"\n-----BEGIN AGE ENCRYPTED FILE-----\n"));
        assert!(!is_encrypted(b"{\"metadata\":"));
        assert!(!is_encrypted(b""));
    }
}
