//! Checking what is left in bpffs (pinned maps, programs and links).

use std::path::PathBuf;

/// Every file and directory below `path` (not `path` itself), depth first, sorted within each
/// directory. Empty if `path` does not exist or cannot be read; a subdirectory that cannot be read is
/// listed without its contents.
pub fn bpffs_entries_under(path: impl Into<PathBuf>) -> Vec<PathBuf> {
    fn walk(directory: &std::path::Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(directory) else {
            return;
        };
        let mut children: Vec<_> = entries.filter_map(|entry| entry.ok()).collect();
        children.sort_by_key(|entry| entry.file_name());
        for child in children {
            let child_path = child.path();
            let is_directory = child.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
            found.push(child_path.clone());
            if is_directory {
                walk(&child_path, found);
            }
        }
    }
    let mut found = Vec::new();
    walk(&path.into(), &mut found);
    found
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn listing_of_a_missing_directory_is_empty() {
        assert!(bpffs_entries_under("/nonexistent/lb-tests").is_empty());
    }

    #[test]
    fn listing_is_recursive() {
        let root = std::env::temp_dir().join(format!("lb-tests-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).expect("create test directories");
        std::fs::write(root.join("a/b/c"), b"").expect("create test file");
        let found = bpffs_entries_under(&root);
        std::fs::remove_dir_all(&root).expect("remove test directories");
        assert_eq!(
            found,
            vec![root.join("a"), root.join("a/b"), root.join("a/b/c")]
        );
    }
}
