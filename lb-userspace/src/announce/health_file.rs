//! keepalived's `track_file`: one decimal number, the count of this node's VIPs that cannot
//! serve. Written atomically (a temporary file in the same directory, then `rename`), so
//! keepalived never reads a half-written value.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

/// Writes `value` (and a newline) to `path`, creating its directory if needed.
pub fn write(path: &Path, value: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir)?;
    let temp = temp_path(path);
    let result = (|| {
        let mut file = fs::File::create(&temp)?;
        writeln!(file, "{value}")?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// The value a previous daemon left, if the file holds one.
pub fn read(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `DIR/.NAME.lb-tmp`: hidden, and in the same file system as `path`, so the rename is atomic.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.lb-tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_number_atomically_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("lb-health-file-{}", std::process::id()));
        let path = dir.join("sub").join("health");
        write(&path, 3).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "3\n");
        assert_eq!(read(&path), Some(3));
        write(&path, 0).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "0\n");
        let left: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            left,
            [std::ffi::OsString::from("health")],
            "no temporary file is left"
        );
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read(&path), None);
    }
}
