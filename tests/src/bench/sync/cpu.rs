//! CPU time of a process from `/proc/PID/stat`: `utime + stime` (fields 14 and 15, in clock
//! ticks, summed over all its threads by the kernel), as a share of one core over a window.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `sysconf(_SC_CLK_TCK)`: the unit of `utime` and `stime`.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).unwrap_or(100).max(1)
}

/// `utime + stime` in a `/proc/PID/stat` line, in ticks.
pub fn parse_stat(stat: &str) -> Result<u64> {
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("no `)` in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("/proc/PID/stat has no field {n}"))?
            .parse()
            .with_context(|| format!("field {n} of /proc/PID/stat"))
    };
    Ok(field(14)? + field(15)?)
}

/// One process's CPU clock.
#[derive(Clone, Copy, Debug)]
pub struct CpuClock {
    pid: u32,
    ticks_per_second: u64,
}

/// A reading of several clocks at one instant.
#[derive(Clone, Debug)]
pub struct Reading {
    pub at: Instant,
    pub busy: Vec<Duration>,
}

impl CpuClock {
    /// The clock of process `pid`, which must be called `comm` (a check that the pid is the
    /// process meant, not a wrapper).
    pub fn new(pid: u32, comm: &str) -> Result<Self> {
        let found = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .with_context(|| format!("reading /proc/{pid}/comm"))?;
        if found.trim() != comm {
            bail!("process {pid} is {:?}, not {comm:?}", found.trim());
        }
        Ok(Self {
            pid,
            ticks_per_second: ticks_per_second(),
        })
    }

    /// CPU time used so far (user + system).
    pub fn busy(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .with_context(|| format!("reading /proc/{}/stat", self.pid))?;
        let ticks = parse_stat(&stat)?;
        Ok(Duration::from_secs_f64(
            ticks as f64 / self.ticks_per_second as f64,
        ))
    }
}

/// Reads every clock of `clocks` now.
pub fn read(clocks: &[CpuClock]) -> Result<Reading> {
    Ok(Reading {
        at: Instant::now(),
        busy: clocks.iter().map(CpuClock::busy).collect::<Result<_>>()?,
    })
}

/// Clock `i`'s CPU use between two readings, in % of one core.
pub fn percent(from: &Reading, to: &Reading, i: usize) -> f64 {
    let wall = to.at.saturating_duration_since(from.at).as_secs_f64();
    let busy = to.busy[i].saturating_sub(from.busy[i]).as_secs_f64();
    if wall > 0.0 {
        busy / wall * 100.0
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utime_and_stime_after_a_name_with_spaces() {
        let stat = "1234 (lb run (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 5 0";
        assert_eq!(parse_stat(stat).expect("parses"), 325);
        assert!(parse_stat("1 (x) S 1").is_err());
    }

    #[test]
    fn this_process_has_a_clock() {
        let me = std::fs::read_to_string("/proc/self/comm").expect("comm");
        let clock = CpuClock::new(std::process::id(), me.trim()).expect("own clock");
        clock.busy().expect("readable");
        assert!(CpuClock::new(std::process::id(), "not-this").is_err());
    }
}
