//! A bounded, seeded fuzz pass over the config parser: arbitrary bytes and mutated valid configs
//! (the shipped example and every config of `src/config/tests.rs`) into [`Config::parse_bytes`].
//! It must never panic, and every error must name `FILE:LINE:COL` with the line and column
//! inside the input (a line that exists, a column at most one past that line's last character).
//!
//! A failure prints the case's seed and its input (escaped), and is replayable with
//! `LB_CONFIG_FUZZ_SEED=S LB_CONFIG_FUZZ_CASES=1`. `LB_CONFIG_FUZZ_CASES=N` runs a longer pass.
//! Every input that ever found a bug is in [`REGRESSIONS`] and runs first.

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

use lb::config::Config;

const FILE: &str = "fuzz.toml";
/// Cases of the default pass: a few seconds in a debug build on one core.
const DEFAULT_CASES: u64 = 60_000;
const DEFAULT_SEED: u64 = 0x5eed_c0f1_6f22;

const EXAMPLE: &str = include_str!("../../dist/lb.toml.example");
const UNIT_TESTS: &str = include_str!("../src/config/tests.rs");

/// Inputs that once broke a rule here (each the bug it found; see the fix in `src/config/`).
const REGRESSIONS: &[&[u8]] = &[
    // Values echoed in messages broke the single line: a multi-line string as a VIP name gave
    // "vip name `multi<newline>line` ..."; control characters are escaped now.
    b"interface = \"eth0\"\n[[vip]]\nname = '''\nmulti\nline'''\naddress = \"10.0.0.1\"\nport = 1\n",
    b"interface = '''\nmulti\nline'''\n",
    b"interface = \"a\\u0000b\\u001b[31m\"\n",
    // Invalid UTF-8 was `FILE: cannot read: stream did not contain valid UTF-8`, without a
    // position; it is now an error at the first invalid byte.
    b"interface = \"eth\xff0\"\n",
    b"\xc3",
    b"a = 1\n\n  \xe2\x82",
];

/// xorshift64*: small, fast and the same everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The configs to mutate: the shipped example and every string literal of the unit tests that
/// looks like config text (raw strings as written, ordinary ones unescaped), each also appended
/// to the unit tests' one-VIP base (many tests add a fragment to it).
fn corpus() -> Vec<String> {
    let mut literals = Vec::new();
    let mut rest = UNIT_TESTS;
    while let Some(start) = rest.find('"') {
        if rest[..start].ends_with("r#") {
            rest = &rest[start + 1..];
            let Some(end) = rest.find("\"#") else { break };
            literals.push(rest[..end].to_owned());
            rest = &rest[end + 2..];
            continue;
        }
        rest = &rest[start + 1..];
        let mut literal = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = i + 1;
                    break;
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => literal.push('\n'),
                    Some('t') => literal.push('\t'),
                    Some('0') => literal.push('\0'),
                    Some('\n') => {
                        // A line continuation: skip the next line's indentation.
                        let skip = rest[i + 2..].len() - rest[i + 2..].trim_start().len();
                        for _ in 0..skip {
                            chars.next();
                        }
                    }
                    Some(other) => literal.push(other),
                    None => {}
                },
                c => literal.push(c),
            }
        }
        literals.push(literal);
        rest = &rest[end..];
    }
    let mut configs = vec![EXAMPLE.to_owned()];
    let base = literals
        .iter()
        .find(|l| l.starts_with("interface = ") && l.contains("[[vip.backend]]"))
        .cloned()
        .unwrap_or_default();
    for literal in literals.into_iter().filter(|l| l.contains(" = ")) {
        configs.push(format!("{base}{literal}"));
        configs.push(literal);
    }
    configs
}

/// Values of every TOML type and of the edges: huge numbers, unicode, NULs, nesting, long strings.
fn value(rng: &mut Rng) -> String {
    match rng.below(24) {
        0 => "0".into(),
        1 => "-1".into(),
        2 => "9223372036854775807".into(),
        3 => "-9223372036854775808".into(),
        4 => "99999999999999999999999999".into(),
        5 => "1e308".into(),
        6 => "nan".into(),
        7 => "-inf".into(),
        8 => "true".into(),
        9 => "\"\"".into(),
        10 => "\"héllo wörld ☃ 𝄞\"".into(),
        11 => "\"a\\u0000b\"".into(),
        12 => format!("\"{}\"", "x".repeat(rng.below(70_000))),
        13 => format!(
            "{}1{}",
            "[".repeat(rng.below(200)),
            "]".repeat(rng.below(200))
        ),
        14 => format!(
            "{}{}",
            "{ a = ".repeat(rng.below(100)),
            "}".repeat(rng.below(100))
        ),
        15 => "[1, \"two\", 3.0]".into(),
        16 => "{ port = 1, rise = \"x\" }".into(),
        17 => "1979-05-27T07:32:00Z".into(),
        18 => "'''\nmulti\nline'''".into(),
        19 => "\"\"\"\n\"\"\"".into(),
        20 => format!("{}", rng.next() as i64),
        21 => format!("\"{}s\"", rng.next()),
        22 => "\"10.0.0.1\"".into(),
        _ => "\"2001:db8::1\"".into(),
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    const INTERESTING: &[u8] = b"[]{}=\"'\n\r\t #.,\\\x00\xff\xc3\xe2";
    (0..len)
        .map(|_| {
            if rng.chance(2) {
                *rng.pick(INTERESTING)
            } else {
                rng.next() as u8
            }
        })
        .collect()
}

/// One mutation of `text` (as lines, or as bytes).
fn mutate(rng: &mut Rng, text: &mut Vec<u8>) {
    let mut lines: Vec<Vec<u8>> = text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let n = lines.len();
    match rng.below(14) {
        0 => {
            lines.remove(rng.below(n));
        }
        1 => {
            let i = rng.below(n);
            let line = lines[i].clone();
            lines.insert(rng.below(n + 1), line);
        }
        2 => {
            let (i, j) = (rng.below(n), rng.below(n));
            lines.swap(i, j);
        }
        3..=5 => {
            // Another value (often of another type) for a key.
            let i = rng.below(n);
            if let Some(eq) = lines[i].iter().position(|&b| b == b'=') {
                let mut line = lines[i][..=eq].to_vec();
                line.push(b' ');
                line.extend_from_slice(value(rng).as_bytes());
                lines[i] = line;
            }
        }
        6 => {
            let i = rng.below(n + 1);
            let key = rng.pick(&["name", "port", "weight", "health", "vip", "x", "interface"]);
            let line = format!("{key} = {}", value(rng));
            lines.insert(i, line.into_bytes());
        }
        7 => {
            let i = rng.below(n + 1);
            let header = rng.pick(&[
                "[[vip]]",
                "[[vip.backend]]",
                "[vip.health]",
                "[announce]",
                "[vip]",
                "[[vip.backend.health]]",
                "[a.b.c.d.e.f.g]",
                "[[]]",
                "[",
            ]);
            lines.insert(i, header.as_bytes().to_vec());
        }
        8 => {
            // Truncate anywhere (mid-character too).
            text.truncate(rng.below(text.len() + 1));
            return;
        }
        9 => {
            let at = rng.below(text.len() + 1);
            let len = 1 + rng.below(16);
            let bytes = random_bytes(rng, len);
            text.splice(at..at, bytes);
            return;
        }
        10 => {
            if !text.is_empty() {
                let at = rng.below(text.len());
                text[at] ^= 1 << rng.below(8);
            }
            return;
        }
        11 => {
            if !text.is_empty() {
                let at = rng.below(text.len());
                let len = rng.below(text.len() - at + 1).min(64);
                text.drain(at..at + len);
            }
            return;
        }
        12 => {
            // A NUL, a CR, a lone surrogate's bytes or an overlong encoding.
            let at = rng.below(text.len() + 1);
            const ODD: [&[u8]; 5] = [b"\0", b"\r", b"\xed\xa0\x80", b"\xc0\x80", b"\r\n"];
            let bytes = *rng.pick(&ODD);
            text.splice(at..at, bytes.iter().copied());
            return;
        }
        _ => {
            let i = rng.below(n);
            let indent = " ".repeat(rng.below(40));
            let mut line = indent.into_bytes();
            line.extend_from_slice(&lines[i]);
            lines[i] = line;
        }
    }
    *text = lines.join(&b'\n');
}

/// A case's input: random bytes now and then, else a config from the corpus, mutated 1-8 times.
fn generate(rng: &mut Rng, corpus: &[String]) -> Vec<u8> {
    if rng.chance(10) {
        let len = rng.below(512);
        return random_bytes(rng, len);
    }
    let mut text = rng.pick(corpus).as_bytes().to_vec();
    for _ in 0..1 + rng.below(8) {
        mutate(rng, &mut text);
    }
    text
}

/// Parses `input`: `Ok(true)` for a valid config, `Ok(false)` for a well-formed error, `Err`
/// saying which rule it broke.
fn check(input: &[u8]) -> Result<bool, String> {
    let parsed = panic::catch_unwind(AssertUnwindSafe(|| {
        Config::parse_bytes(input, Path::new(FILE))
    }));
    let error = match parsed {
        Err(_) => return Err("the parser panicked".into()),
        Ok(Ok(_)) => return Ok(true),
        Ok(Err(error)) => error.to_string(),
    };
    if error.contains('\n') {
        return Err(format!("the error is not one line: {error:?}"));
    }
    let position = error
        .strip_prefix(&format!("{FILE}:"))
        .and_then(|rest| rest.split_once(": "))
        .map(|(position, _)| position);
    let Some((line, column)) = position
        .and_then(|p| p.split_once(':'))
        .and_then(|(l, c)| Some((l.parse::<usize>().ok()?, c.parse::<usize>().ok()?)))
    else {
        return Err(format!("the error has no FILE:LINE:COL: {error}"));
    };
    let text = String::from_utf8_lossy(input);
    let lines: Vec<&str> = text.split('\n').collect();
    if line == 0 || line > lines.len() {
        return Err(format!(
            "line {line} is outside the input ({} lines): {error}",
            lines.len()
        ));
    }
    // Columns count characters; a lossy U+FFFD stands for one invalid sequence, which may be
    // more than one byte, so the bound is the line's bytes (>= its characters) plus one.
    let width = lines[line - 1].chars().count().max(
        input
            .split(|&b| b == b'\n')
            .nth(line - 1)
            .map_or(0, <[u8]>::len),
    );
    if column == 0 || column > width + 1 {
        return Err(format!(
            "column {column} is outside line {line} ({width} characters): {error}"
        ));
    }
    Ok(false)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

fn show(input: &[u8]) -> String {
    let shown: String = input.escape_ascii().to_string();
    if shown.len() > 4000 {
        format!("{}... ({} bytes)", &shown[..4000], input.len())
    } else {
        shown
    }
}

#[test]
fn regressions() {
    for input in REGRESSIONS {
        if let Err(why) = check(input) {
            panic!("regression b\"{}\": {why}", show(input));
        }
    }
}

#[test]
fn the_corpus_is_valid() {
    // The example must parse: mutating only broken configs would reach validation less often.
    Config::parse(EXAMPLE, Path::new(FILE)).unwrap_or_else(|e| panic!("{e}"));
    let corpus = corpus();
    let valid = corpus
        .iter()
        .filter(|text| Config::parse(text, Path::new(FILE)).is_ok())
        .count();
    assert!(
        corpus.len() > 100 && valid > 10,
        "found {} configs, {valid} of them valid",
        corpus.len()
    );
    eprintln!("{} configs to mutate, {valid} of them valid", corpus.len());
}

#[test]
fn mutated_and_random_configs() {
    let corpus = corpus();
    let seed = env_u64("LB_CONFIG_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let cases = env_u64("LB_CONFIG_FUZZ_CASES").unwrap_or(DEFAULT_CASES);
    let mut failures = Vec::new();
    let mut valid = 0;
    for case in 0..cases {
        let case_seed = seed.wrapping_add(case);
        let input = generate(&mut Rng::new(case_seed), &corpus);
        match check(&input) {
            Ok(is_valid) => valid += u64::from(is_valid),
            Err(why) => {
                failures.push(format!(
                    "seed {case_seed:#x}: {why}\n  input: b\"{}\"",
                    show(&input)
                ));
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failing case(s) (replay: LB_CONFIG_FUZZ_SEED=S LB_CONFIG_FUZZ_CASES=1):\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{cases} cases from seed {seed:#x}: {valid} still valid configs, no panic, every error inside its input"
    );
}
