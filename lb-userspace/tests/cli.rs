//! The `lb` binary's config checking, as an operator runs it: exit codes and exact messages.

use std::{path::PathBuf, process::Command};

fn write_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn check_config(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["check-config", "--config"])
        .arg(path)
        .output()
        .expect("run lb");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const VALID: &str = r#"interface = "eth0"
[[vip]]
name = "web"
address = "10.0.0.100"
port = 80
protocol = "tcp"
[[vip.backend]]
address = "10.0.0.11"
[[vip.backend]]
address = "10.0.0.12"
weight = 0
"#;

#[test]
fn a_valid_config_exits_zero() {
    let path = write_config("valid.toml", VALID);
    let (code, stdout, stderr) = check_config(&path);
    assert_eq!(code, 0, "stdout: {stdout} stderr: {stderr}");
    assert_eq!(
        stdout.trim(),
        format!("{}: ok (1 VIPs, 2 backends)", path.display())
    );
}

#[test]
fn errors_print_file_line_column_and_exit_one() {
    let cases = [
        (
            "unknown-key.toml",
            VALID.replace("protocol = \"tcp\"", "protocl = \"tcp\""),
            "6:1",
            "unknown field `protocl`",
        ),
        (
            "port.toml",
            VALID.replace("port = 80", "port = 70000"),
            "5:8",
            "70000",
        ),
        (
            "family.toml",
            VALID.replace("address = \"10.0.0.12\"", "address = \"2001:db8::12\""),
            "10:11",
            "IPv6",
        ),
        (
            "mode.toml",
            format!("xdp_mode = \"fast\"\n{VALID}"),
            "1:12",
            "fast",
        ),
        (
            "duplicate.toml",
            format!(
                "{VALID}[[vip]]\nname = \"web2\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n"
            ),
            "14:11",
            "as vip `web` on line 2",
        ),
    ];
    for (name, text, line_col, needle) in cases {
        let path = write_config(name, &text);
        let (code, stdout, stderr) = check_config(&path);
        assert_eq!(code, 1, "{name}: stdout {stdout} stderr {stderr}");
        let prefix = format!("{}:{line_col}: ", path.display());
        assert!(
            stderr.starts_with(&prefix),
            "{name}: expected `{prefix}...`, got: {stderr}"
        );
        assert!(
            stderr.contains(needle),
            "{name}: expected {needle:?} in: {stderr}"
        );
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{name}: one line expected: {stderr}"
        );
    }
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let path = std::env::temp_dir().join("lb-cli-does-not-exist.toml");
    let (code, _, stderr) = check_config(&path);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with(&format!("{}: cannot read", path.display())),
        "{stderr}"
    );
}
