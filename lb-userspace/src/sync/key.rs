//! The key the nodes of one cluster share to authenticate their sync datagrams.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What an operator writes: the output of `openssl rand -hex 32`.
const HEX_LEN: usize = 64;

/// A 32-byte HMAC-SHA256 key. Its `Debug` never shows the key, so it can sit in logged structs.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncKey([u8; 32]);

/// Why a key could not be loaded; the message is meant for the operator who wrote the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{}: can't read the sync key: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `path` is `None` for a key given as a string ([`SyncKey::from_hex`]).
    #[error("{}{problem}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        path: Option<PathBuf>,
        problem: KeyProblem,
    },
}

/// What is wrong with the key's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyProblem {
    #[error(
        "expected 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`), found {found} characters"
    )]
    Length { found: usize },
    /// `position` counts characters from 1, as an editor's column does.
    #[error(
        "expected 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`), not a hex digit at character {position} ({ch:?})"
    )]
    NotHex { position: usize, ch: char },
}

impl SyncKey {
    /// Reads a key file: exactly 64 hex characters, optionally followed by whitespace (a newline).
    pub fn from_file(path: &Path) -> Result<SyncKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?;
        parse(&text).map_err(|problem| KeyError::Invalid {
            path: Some(path.to_owned()),
            problem,
        })
    }

    /// The same rules as [`SyncKey::from_file`], for a key given as text.
    pub fn from_hex(text: &str) -> Result<SyncKey, KeyError> {
        parse(text).map_err(|problem| KeyError::Invalid {
            path: None,
            problem,
        })
    }

    pub fn from_bytes(bytes: [u8; 32]) -> SyncKey {
        SyncKey(bytes)
    }

    /// The raw key, for keying the MAC.
    pub(crate) fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncKey(..)")
    }
}

fn parse(text: &str) -> Result<SyncKey, KeyProblem> {
    // Only trailing whitespace is allowed: `echo`/`openssl` end the file with a newline, and
    // anything before the key is more likely a wrong file than formatting.
    let text = text.trim_end();
    // Length first: a key of another format (base64, a passphrase) is best told by its length.
    let found = text.chars().count();
    if found != HEX_LEN {
        return Err(KeyProblem::Length { found });
    }
    // Checked by hand rather than from hex's error, which counts bytes and, for non-ASCII text,
    // reports a length problem before the bad character.
    if let Some((i, ch)) = text
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii_hexdigit())
    {
        return Err(KeyProblem::NotHex {
            position: i + 1,
            ch,
        });
    }
    let mut bytes = [0u8; 32];
    // Cannot fail after the checks above; mapped rather than unwrapped all the same.
    hex::decode_to_slice(text, &mut bytes).map_err(|_| KeyProblem::Length { found })?;
    Ok(SyncKey(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210";

    fn good_bytes() -> [u8; 32] {
        let mut b = [0u8; 32];
        hex::decode_to_slice(GOOD, &mut b).expect("GOOD is valid hex");
        b
    }

    /// A key file that is removed when dropped.
    struct TempKey(PathBuf);

    impl Drop for TempKey {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    impl std::ops::Deref for TempKey {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    fn write_key(name: &str, contents: &[u8]) -> TempKey {
        let path = std::env::temp_dir().join(format!("lb-sync-key-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        TempKey(path)
    }

    #[test]
    fn good_file_with_and_without_newline() {
        for (name, contents) in [
            ("plain", GOOD.to_string()),
            ("newline", format!("{GOOD}\n")),
            ("crlf-and-spaces", format!("{GOOD}  \r\n\n")),
            ("upper", GOOD.to_uppercase()),
        ] {
            let path = write_key(name, contents.as_bytes());
            let key = SyncKey::from_file(&path)
                .unwrap_or_else(|e| panic!("{name}: {contents:?} refused: {e}"));
            assert_eq!(key.as_bytes(), &good_bytes(), "{name}: wrong bytes");
        }
    }

    #[test]
    fn from_hex_and_from_bytes_agree() {
        let key = SyncKey::from_hex(GOOD).unwrap_or_else(|e| panic!("GOOD refused: {e}"));
        assert_eq!(key, SyncKey::from_bytes(good_bytes()));
    }

    #[test]
    fn debug_hides_the_key() {
        let key = SyncKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?} {:?}", Some(&key));
        assert_eq!(shown, "SyncKey(..) Some(SyncKey(..))");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    }

    #[test]
    fn short_file_says_how_many_characters() {
        let path = write_key("short", format!("{}\n", &GOOD[..63]).as_bytes());
        let err = SyncKey::from_file(&path).expect_err("63 characters accepted");
        assert!(
            matches!(
                err,
                KeyError::Invalid {
                    problem: KeyProblem::Length { found: 63 },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "{}: expected 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`), found 63 characters",
                path.display()
            )
        );
    }

    #[test]
    fn long_key_and_leading_space_are_length_errors() {
        for (text, found) in [
            (format!("{GOOD}0"), 65),
            (format!(" {GOOD}"), 65),
            (String::new(), 0),
            ("\n".to_string(), 0),
            (format!("{GOOD}\n{GOOD}\n"), 129),
        ] {
            let err = SyncKey::from_hex(&text).expect_err(&text);
            assert!(
                matches!(err, KeyError::Invalid { path: None, problem: KeyProblem::Length { found: f } } if f == found),
                "{text:?}: {err:?}"
            );
        }
    }

    #[test]
    fn non_hex_character_is_located() {
        let mut text = GOOD.to_string();
        text.replace_range(16..17, "g");
        let path = write_key("nothex", text.as_bytes());
        let err = SyncKey::from_file(&path).expect_err("a 'g' accepted");
        assert_eq!(
            err.to_string(),
            format!(
                "{}: expected 64 hex characters (32 bytes, e.g. `openssl rand -hex 32`), not a hex digit at character 17 ('g')",
                path.display()
            )
        );
    }

    #[test]
    fn non_ascii_character_counts_as_one_character() {
        // 64 characters, one of them two bytes long: still "character 3", not a length error.
        let text = format!("ab\u{e9}{}", &GOOD[3..]);
        assert_eq!(text.chars().count(), 64);
        let err = SyncKey::from_hex(&text).expect_err("non-ASCII accepted");
        assert!(
            matches!(
                err,
                KeyError::Invalid {
                    problem: KeyProblem::NotHex {
                        position: 3,
                        ch: '\u{e9}'
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("expected 64 hex"), "{err}");
    }

    #[test]
    fn unreadable_file_names_the_path() {
        let path = std::env::temp_dir().join("lb-sync-key-does-not-exist/key");
        let err = SyncKey::from_file(&path).expect_err("missing file accepted");
        let KeyError::Read { source, .. } = &err else {
            panic!("expected a read error, got {err:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{}: can't read the sync key: ", path.display())),
            "{shown}"
        );
    }
}
