//! Differential fuzzing of the data plane: the real XDP program against the reference model
//! (`lb_tests::model`), on a fixed seed, and the corpus of every frame that ever found a bug.

use lb_tests::fuzz::{self, FuzzLab, Options, corpus};

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn fixed_seed_fuzz_pass_has_no_differences() {
    let report = fuzz::run(Options {
        seed: fuzz::FIXED_SEED,
        packets: 200_000,
        max_differences: 5,
    })
    .unwrap_or_else(|e| panic!("fuzzing lab: {e}"));
    println!("{report}");
    assert!(
        report.differences.is_empty(),
        "the program and the model disagree:\n{report}"
    );
    // The pass must reach every verdict reason, or it proves less than it seems to; except the
    // encapsulation's: the fuzz lab's VIPs forward at L2 (the model has no tunnels), and those
    // paths have their byte-exact tests in tests/tests/encap.rs.
    use lb_common::Reason;
    let encapsulation_only = [
        Reason::IcmpTooBig,
        Reason::DropTooBig,
        Reason::DropEncapFailed,
    ];
    for (reason, n) in Reason::ALL.iter().zip(report.reasons) {
        if encapsulation_only.contains(reason) {
            assert_eq!(n, 0, "{} without an encapsulating VIP", reason.name());
            continue;
        }
        assert!(
            n > 0,
            "no frame of the fixed seed ended as {}",
            reason.name()
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn corpus_replays_without_differences() {
    let dir = corpus::default_dir();
    let entries = corpus::load(&dir).unwrap_or_else(|e| panic!("corpus: {e}"));
    assert!(
        !entries.is_empty(),
        "no corpus entries in {}",
        dir.display()
    );
    let mut lab = FuzzLab::new(fuzz::FIXED_SEED).unwrap_or_else(|e| panic!("fuzzing lab: {e}"));
    let mut failures = Vec::new();
    for entry in &entries {
        let (_, what) = lab
            .check(&entry.frame)
            .unwrap_or_else(|e| panic!("{}: {e}", entry.path.display()));
        if !what.is_empty() {
            let d = fuzz::Difference {
                seed: None,
                index: 0,
                frame: entry.frame.clone(),
                what,
            };
            failures.push(format!(
                "{} ({}):\n{d}",
                entry.path.display(),
                entry.comment
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
