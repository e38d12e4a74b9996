//! Config errors, and the translation of byte offsets into the `FILE:LINE:COL` every error names.

use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Why a config file was rejected.
///
/// Display is a single line an editor or a terminal can jump to: `FILE:LINE:COL: message` for
/// anything wrong with the contents (1-based line and column, FILE as the caller gave it), and
/// `FILE: cannot read: <io error>` when the file could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read. The I/O error is part of the message and deliberately not
    /// exposed as `source()`, so error-chain printers (`{:#}` of anyhow) do not print it twice.
    #[error("{}: cannot read: {io}", path.display())]
    Read { path: PathBuf, io: io::Error },

    /// The file is not valid TOML, has an unknown key or a value of the wrong type, or breaks a
    /// rule of the config (duplicate VIP, port out of range, ...).
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// 1-based column, counted in characters (not bytes) from the start of the line.
        column: usize,
        /// One line, without position.
        message: String,
    },
}

impl ConfigError {
    /// An [`ConfigError::Invalid`] pointing at byte offset `span.start` of `text`.
    pub(crate) fn at(path: &Path, text: &str, span: Range<usize>, message: String) -> Self {
        let (line, column) = line_and_column(text, span.start);
        ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            column,
            message: escape_controls(&message),
        }
    }

    /// The error for `bytes` that are valid UTF-8 up to byte `valid_up_to` and not after it.
    pub(super) fn invalid_utf8(path: &Path, bytes: &[u8], valid_up_to: usize) -> Self {
        let valid_up_to = valid_up_to.min(bytes.len());
        // The prefix is valid by definition; the fallback is never taken.
        let text = std::str::from_utf8(&bytes[..valid_up_to]).unwrap_or_default();
        let byte = bytes.get(valid_up_to).copied().unwrap_or_default();
        ConfigError::at(
            path,
            text,
            valid_up_to..valid_up_to,
            format!("not valid UTF-8 (byte 0x{byte:02x}); a config file is UTF-8 text"),
        )
    }

    /// Wraps a `toml` deserialisation error. We keep toml's message and span but not its
    /// multi-line rendering (source excerpt and caret), so the result stays one line.
    pub(crate) fn from_toml(path: &Path, text: &str, error: &toml::de::Error) -> Self {
        // toml reports "missing field" at the document root with the root's span, and every
        // other error with a span; 0 (line 1, column 1) is the honest fallback if one lacks it.
        let span = error.span().unwrap_or(0..0);
        let mut message = one_line(error.message());
        if message == "invalid type: map, expected a sequence" {
            // The likeliest cause: `[vip]` where `[[vip]]` was meant.
            message.push_str(" (each VIP is a `[[vip]]` table, each backend a `[[vip.backend]]`)");
        }
        ConfigError::at(path, text, span, message)
    }
}

/// toml's parser messages can be two lines ("invalid table header\nexpected `.`, `]`"); join
/// them so the whole error stays on one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

/// `message` with its control characters escaped (`\n`, `\u{0}`, ...): messages quote values
/// from the file, and a value can hold a newline (a multi-line string) or a NUL, which must not
/// break the error's single line or reach a terminal raw.
fn escape_controls(message: &str) -> String {
    let mut escaped = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

/// 1-based line and character column of byte `offset` in `text`. An offset at or past the end
/// (toml reports "unexpected end of input" there) lands just after the last character.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_and_column(text, 0), (1, 1));
        assert_eq!(line_and_column(text, 4), (1, 5));
        assert_eq!(line_and_column(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters: the string starts at column 6.
        assert_eq!(line_and_column(text, text.find('"').unwrap()), (2, 6));
        assert_eq!(line_and_column(text, text.len()), (3, 1));
        assert_eq!(line_and_column(text, text.len() + 10), (3, 1));
        assert_eq!(line_and_column("", 0), (1, 1));
    }

    #[test]
    fn control_characters_in_messages_are_escaped() {
        assert_eq!(
            escape_controls("name `a\nb\tc\u{0}d\u{1b}[31m` é"),
            "name `a\\nb\\tc\\u{0}d\\u{1b}[31m` é"
        );
    }

    #[test]
    fn multi_line_toml_messages_become_one_line() {
        assert_eq!(
            one_line("invalid table header\nexpected `.`, `]`\n"),
            "invalid table header: expected `.`, `]`"
        );
        assert_eq!(one_line("missing field `port`"), "missing field `port`");
    }
}
