//! Runs `lb_decap` on hand-built frames through `BPF_PROG_TEST_RUN`, with its real maps (not
//! pinned) written the way `lb decap` writes them.

use std::net::IpAddr;

use aya::{
    Ebpf, TestRun as _, TestRunOptions,
    maps::{Array, HashMap, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    Counters,
    decap::{
        DecapConfig, DecapReason, DecapVip, MAP_DECAP_CONFIG, MAP_DECAP_STATS, MAP_DECAP_VIPS,
    },
};

pub struct DecapLab {
    ebpf: Ebpf,
}

impl DecapLab {
    /// Loads `lb_decap` for `vips` and GUE port `gue_port`.
    pub fn new(vips: &[IpAddr], gue_port: u16) -> Self {
        let mut ebpf = lb::decap::load(None)
            .unwrap_or_else(|e| panic!("loading lb_decap failed (run as root): {e}"));
        {
            let mut config: Array<_, DecapConfig> =
                Array::try_from(ebpf.map_mut(MAP_DECAP_CONFIG).expect("DECAP_CONFIG"))
                    .expect("an array");
            config
                .set(
                    0,
                    DecapConfig {
                        gue_port_be: gue_port.to_be(),
                        _pad: [0; 6],
                    },
                    0,
                )
                .expect("writing DECAP_CONFIG");
        }
        {
            let mut map: HashMap<_, DecapVip, u32> =
                HashMap::try_from(ebpf.map_mut(MAP_DECAP_VIPS).expect("DECAP_VIPS"))
                    .expect("a hash map");
            for &vip in vips {
                map.insert(lb::decap::vip_key(vip), 1, 0)
                    .expect("writing DECAP_VIPS");
            }
        }
        Self { ebpf }
    }

    /// Runs the program once on `frame`: the verdict and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(lb::decap::PROGRAM_NAME)
            .expect("lb_decap")
            .try_into()
            .expect("an XDP program");
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The packets counted for each reason, summed over the CPUs.
    pub fn counts(&self) -> Vec<(DecapReason, u64)> {
        let stats: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(MAP_DECAP_STATS).expect("DECAP_STATS"))
                .expect("a per-CPU array");
        DecapReason::ALL
            .iter()
            .map(|&reason| {
                let values = stats.get(&(reason as u32), 0).expect("reading DECAP_STATS");
                (reason, values.iter().map(|c| c.packets).sum())
            })
            .collect()
    }

    /// The packets counted for `reason`.
    pub fn count(&self, reason: DecapReason) -> u64 {
        self.counts()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }
}
