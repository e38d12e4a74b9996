//! `lb run --log-format`: log lines on stderr as text for people or as JSON objects for log
//! collectors. Runs the binary against an interface that does not exist, so it fails at once,
//! without root, after logging one error.

use std::{path::PathBuf, process::Command};

/// An interface name no test machine has (15 bytes at most, as the kernel requires).
const MISSING_INTERFACE: &str = "lbtestnoif0";

/// Writes the config to a file of its own per test (tests run in parallel).
fn write_config(test: &str) -> PathBuf {
    let path =
        std::env::temp_dir().join(format!("lb-log-format-{}-{test}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "interface = \"{MISSING_INTERFACE}\"\n\
             [[vip]]\nname = \"web\"\naddress = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\n\
             [[vip.backend]]\naddress = \"10.0.0.11\"\n"
        ),
    )
    .expect("write config");
    path
}

/// Runs `lb` with `args` and a config of its own for `test`; returns the exit code and stderr.
fn run_lb(test: &str, args: &[&str]) -> (i32, String) {
    let config = write_config(test);
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(args)
        .arg("--config")
        .arg(&config)
        .env_remove("LB_LOG")
        .output()
        .expect("run lb");
    std::fs::remove_file(&config).expect("remove config");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.is_empty(), "nothing belongs on stdout: {stdout}");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every stderr line is a JSON object with a level and a message; the error names the interface.
fn assert_json_logs(stderr: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no log lines on stderr");
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}\nstderr:\n{stderr}"));
        let object = value
            .as_object()
            .unwrap_or_else(|| panic!("not a JSON object: {line:?}"));
        assert!(
            object.get("level").and_then(|l| l.as_str()).is_some(),
            "no \"level\" in {line:?}"
        );
        let message = object
            .get("fields")
            .and_then(|f| f.get("message"))
            .or_else(|| object.get("message"));
        assert!(
            message.and_then(|m| m.as_str()).is_some(),
            "no \"fields\".\"message\" or \"message\" in {line:?}"
        );
        assert!(!line.contains('\u{1b}'), "colour codes in JSON: {line:?}");
    }
    let error = lines
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|v| v["level"] == "ERROR")
        .unwrap_or_else(|| panic!("no ERROR line in:\n{stderr}"));
    let message = error["fields"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(MISSING_INTERFACE),
        "the error does not name the interface: {error}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let (code, stderr) = run_lb("json", &["run", "--log-format", "json"]);
    assert_eq!(code, 1, "stderr:\n{stderr}");
    assert_json_logs(&stderr);
}

#[test]
fn log_format_is_also_accepted_before_the_command() {
    let (code, stderr) = run_lb("global", &["--log-format", "json", "run"]);
    assert_eq!(code, 1, "stderr:\n{stderr}");
    assert_json_logs(&stderr);
}

#[test]
fn text_logs_stay_plain_text() {
    for args in [&["run"][..], &["run", "--log-format", "text"][..]] {
        let (code, stderr) = run_lb("text", args);
        assert_eq!(code, 1, "{args:?}, stderr:\n{stderr}");
        let error = stderr
            .lines()
            .find(|line| line.contains("ERROR"))
            .unwrap_or_else(|| panic!("{args:?}: no ERROR line in:\n{stderr}"));
        assert!(
            error.contains(MISSING_INTERFACE),
            "{args:?}: the error does not name the interface: {error}"
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(error).is_err(),
            "{args:?}: text logs came out as JSON: {error}"
        );
        // stderr is a pipe here, not a terminal: no colour codes.
        assert!(
            !stderr.contains('\u{1b}'),
            "{args:?}: colour codes: {stderr:?}"
        );
    }
}

#[test]
fn an_unknown_log_format_is_a_usage_error() {
    let (code, stderr) = run_lb("unknown", &["run", "--log-format", "xml"]);
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert!(stderr.contains("possible values: text, json"), "{stderr}");
}
