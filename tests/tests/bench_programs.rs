//! The benchmarks' reference programs do exactly what the benchmarks assume of them.

use aya::{Ebpf, TestRun as _, TestRunOptions, programs::Xdp};
use lb_tests::frames::FrameSpec;

fn run(ebpf: &mut Ebpf, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
    let program: &mut Xdp = ebpf
        .program_mut(program)
        .expect("program")
        .try_into()
        .expect("xdp");
    program.load().ok();
    let mut out = vec![0u8; frame.len() + 64];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        })
        .expect("test run");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn reflect_swaps_the_macs_gen_renumbers_the_source_port_drop_counts() {
    let mut ebpf = Ebpf::load(lb::bench_object()).expect("loading the bench object");
    let frame = FrameSpec::udp(
        "10.0.0.1".parse().unwrap(),
        1234,
        "10.0.0.2".parse().unwrap(),
        53,
        b"x",
    )
    .build();

    let (verdict, out) = run(&mut ebpf, "bench_reflect", &frame);
    assert_eq!(verdict, 3, "XDP_TX");
    let mut expected = frame.clone();
    expected[0..6].copy_from_slice(&frame[6..12]);
    expected[6..12].copy_from_slice(&frame[0..6]);
    assert_eq!(out, expected);

    let (verdict, out) = run(&mut ebpf, "bench_gen", &frame);
    assert_eq!(verdict, 3, "XDP_TX");
    assert_eq!(
        &out[..34],
        &frame[..34],
        "headers before the source port unchanged"
    );
    assert_ne!(&out[34..36], &frame[34..36], "a new source port");
    assert_eq!(
        &out[36..],
        &frame[36..],
        "everything after the source port unchanged"
    );

    assert_eq!(run(&mut ebpf, "bench_drop", &frame).0, 1, "XDP_DROP");
    assert_eq!(run(&mut ebpf, "bench_pass", &frame).0, 2, "XDP_PASS");
}
