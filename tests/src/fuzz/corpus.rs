//! The saved frames that once found a bug: one per `*.hex` file, `#` lines are comments (what the
//! frame found), the rest is the frame in hex (whitespace ignored).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

pub struct Entry {
    pub path: PathBuf,
    pub comment: String,
    pub frame: Vec<u8>,
}

/// The corpus directory of the repository.
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/dataplane")
}

/// Every entry of `dir`, in file-name order.
pub fn load(dir: &Path) -> Result<Vec<Entry>, CorpusError> {
    let read_err = |source| CorpusError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_err)?;
    paths.retain(|p| p.extension().is_some_and(|e| e == "hex"));
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).map_err(|source| CorpusError::Read {
                path: path.clone(),
                source,
            })?;
            let (comment, frame) = parse_entry(&text).map_err(|message| CorpusError::Parse {
                path: path.clone(),
                message,
            })?;
            Ok(Entry {
                path,
                comment,
                frame,
            })
        })
        .collect()
}

/// Splits an entry into its comment and its frame.
pub fn parse_entry(text: &str) -> Result<(String, Vec<u8>), String> {
    let mut comment = Vec::new();
    let mut hex = String::new();
    for line in text.lines() {
        match line.trim().strip_prefix('#') {
            Some(c) => comment.push(c.trim()),
            None => hex.extend(line.chars().filter(|c| !c.is_whitespace())),
        }
    }
    let frame = from_hex(&hex)?;
    Ok((comment.join(" "), frame))
}

pub fn from_hex(hex: &str) -> Result<Vec<u8>, String> {
    let hex: Vec<u8> = hex.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !hex.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", hex.len()));
    }
    hex.chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
            u8::from_str_radix(s, 16).map_err(|_| format!("not hex: {s:?}"))
        })
        .collect()
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
