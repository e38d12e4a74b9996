//! Continuous client load for failover tests, from inside the client namespace, on background
//! threads: new TCP connections at a steady rate, and long-lived connections that ask for an
//! answer at a steady pace. Every attempt and every reply is recorded with its [`Instant`]s, so a
//! test can say exactly which connections started after a deadline and what happened to them.
//!
//! New connections: each one connects (with a timeout), sends [`REQUEST_LINE`], reads the
//! identity line and closes. `workers` threads share one schedule (worker `i` takes slots
//! `i, i + workers, ...`), so one attempt that hangs until its timeout does not stall the others.
//! A slot that is already past when its worker is free is skipped, not made up for: the rate
//! stays steady instead of bursting after a stall.
//!
//! Long-lived connections: a [`TcpLineClient`] the test opened (it knows which backend answered),
//! handed over with [`Load::add_long_lived`]. Its thread sends a line every `long_lived_period`
//! and records each answer; the first error ends it (a broken TCP connection stays broken).
//!
//! [`Load::stop`] sets the stop flag, joins every thread and returns all records.

use std::fmt;
use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::NetNs;
use crate::servers::{REQUEST_LINE, TcpLineClient};

/// How the load is paced.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Time between the starts of two new connections (over all workers).
    pub period: Duration,
    /// Threads sharing the new-connection schedule.
    pub workers: usize,
    /// Bounds the connect, the send and the read of each new connection.
    pub timeout: Duration,
    /// Time between two requests on each long-lived connection.
    pub long_lived_period: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            period: Duration::from_millis(10),
            workers: 2,
            timeout: Duration::from_secs(1),
            long_lived_period: Duration::from_millis(50),
        }
    }
}

/// Where a connection attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Connect,
    Send,
    Receive,
}

/// Why an attempt or a request failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub stage: Stage,
    /// The I/O error kind (`UnexpectedEof` when the peer closed without answering).
    pub kind: ErrorKind,
    pub text: String,
}

impl Failure {
    fn io(stage: Stage, error: &io::Error) -> Self {
        Self {
            stage,
            kind: error.kind(),
            text: format!("{stage:?}: {error}"),
        }
    }

    /// The connect got an RST (nothing listens there).
    pub fn refused(&self) -> bool {
        self.stage == Stage::Connect && self.kind == ErrorKind::ConnectionRefused
    }

    /// The connect got no answer at all within its timeout (dropped SYN).
    pub fn timed_out_connecting(&self) -> bool {
        self.stage == Stage::Connect
            && matches!(self.kind, ErrorKind::TimedOut | ErrorKind::WouldBlock)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.text)
    }
}

/// One new connection (or one request on a long-lived connection): when it started and ended,
/// and the identity that answered or why it failed.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    pub result: Result<String, Failure>,
}

impl Attempt {
    /// The identity that answered, if any.
    pub fn identity(&self) -> Option<&str> {
        self.result.as_deref().ok()
    }
    pub fn failed(&self) -> bool {
        self.result.is_err()
    }
    /// Whether the attempt was in progress at some point of `[from, to]`.
    pub fn overlaps(&self, from: Instant, to: Instant) -> bool {
        self.end >= from && self.start <= to
    }
}

/// The history of one long-lived connection.
#[derive(Clone, Debug)]
pub struct LongLived {
    /// Index in [`Load::long_lived`] (the order of [`Load::add_long_lived`]).
    pub index: usize,
    /// The identity that answered when the test opened it: every reply should carry it.
    pub expected: String,
    /// The client's own address (its source port tells the flow).
    pub local_address: Option<SocketAddr>,
    /// When it was handed to the load.
    pub added: Instant,
    /// Every request, in order; the last one is the only one that may have failed.
    pub replies: Vec<Attempt>,
}

impl LongLived {
    /// The failed request that ended the connection, if it broke.
    pub fn broken(&self) -> Option<&Attempt> {
        self.replies.iter().find(|r| r.failed())
    }
    /// Answers from another identity than [`LongLived::expected`] (the flow moved).
    pub fn moved(&self) -> Vec<&Attempt> {
        self.replies
            .iter()
            .filter(|r| r.identity().is_some_and(|i| i != self.expected))
            .collect()
    }
    /// Whether it is still running without an error.
    pub fn alive(&self) -> bool {
        self.broken().is_none()
    }
    /// End of the last successful request.
    pub fn last_answer(&self) -> Option<Instant> {
        self.replies
            .iter()
            .rev()
            .find(|r| !r.failed())
            .map(|r| r.end)
    }
}

/// Everything a [`Load`] recorded.
#[derive(Clone, Debug, Default)]
pub struct LoadRecords {
    /// Every new connection, in the order they ended.
    pub new_connections: Vec<Attempt>,
    pub long_lived: Vec<LongLived>,
}

/// How the long-lived connections of a [`LoadRecords`] fared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongLivedTally {
    /// Connections that ended in an error or stalled too long.
    pub broken: usize,
    /// Connections that answered from another backend than their first at least once.
    pub moved: usize,
    /// Answers over all of them.
    pub answers: usize,
}

impl LoadRecords {
    /// Broken and moved long-lived connections, and their answers.
    pub fn long_lived_tally(&self) -> LongLivedTally {
        LongLivedTally {
            broken: self.long_lived.iter().filter(|l| !l.alive()).count(),
            moved: self
                .long_lived
                .iter()
                .filter(|l| !l.moved().is_empty())
                .count(),
            answers: self.long_lived.iter().map(|l| l.replies.len()).sum(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking worker must not hide the records of the others.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Running load (see the module documentation). Stops (and joins) on drop too.
pub struct Load {
    options: LoadOptions,
    stop: Arc<AtomicBool>,
    new_connections: Arc<Mutex<Vec<Attempt>>>,
    long_lived: Mutex<Vec<Arc<Mutex<LongLived>>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl fmt::Debug for Load {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Load")
            .field("options", &self.options)
            .field("new_connections", &lock(&self.new_connections).len())
            .field("long_lived", &lock(&self.long_lived).len())
            .finish()
    }
}

impl Load {
    /// Starts the new-connection workers in `namespace`, aimed at `target`. Long-lived
    /// connections come later, with [`Load::add_long_lived`].
    pub fn start(namespace: &NetNs, target: SocketAddr, options: LoadOptions) -> Result<Self> {
        let workers = options.workers.max(1);
        let load = Self {
            options,
            stop: Arc::new(AtomicBool::new(false)),
            new_connections: Arc::new(Mutex::new(Vec::new())),
            long_lived: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        };
        let origin = Instant::now();
        let slot = options.period.max(Duration::from_micros(100));
        let stride = slot * workers as u32;
        for worker in 0..workers {
            let stop = Arc::clone(&load.stop);
            let records = Arc::clone(&load.new_connections);
            let first = origin + slot * worker as u32;
            let timeout = options.timeout;
            let handle = namespace.spawn_thread(&format!("load-new-{worker}"), move || {
                let mut next = first;
                while !stop.load(Ordering::Relaxed) {
                    sleep_until(next, &stop);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let attempt = connect_once_here(target, timeout);
                    lock(&records).push(attempt);
                    next += stride;
                    let now = Instant::now();
                    while next < now {
                        next += stride;
                    }
                }
            })?;
            lock(&load.threads).push(handle);
        }
        Ok(load)
    }

    /// Hands over a long-lived connection that answered with `expected` when opened; its thread
    /// asks again every `long_lived_period`. Returns its index.
    pub fn add_long_lived(&self, client: TcpLineClient, expected: impl Into<String>) -> usize {
        let mut all = lock(&self.long_lived);
        let index = all.len();
        let record = Arc::new(Mutex::new(LongLived {
            index,
            expected: expected.into(),
            local_address: client.local_address().ok(),
            added: Instant::now(),
            replies: Vec::new(),
        }));
        all.push(Arc::clone(&record));
        drop(all);
        let stop = Arc::clone(&self.stop);
        let period = self.options.long_lived_period;
        let mut client = client;
        let spawned = std::thread::Builder::new()
            .name(format!("load-long-{index}"))
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let result = client
                        .request("ping")
                        .map_err(|error| long_lived_failure(&error));
                    let failed = result.is_err();
                    lock(&record).replies.push(Attempt {
                        start,
                        end: Instant::now(),
                        result,
                    });
                    if failed {
                        break;
                    }
                    next += period;
                    sleep_until(next, &stop);
                }
            });
        match spawned {
            Ok(handle) => lock(&self.threads).push(handle),
            Err(error) => eprintln!("load: cannot start long-lived connection {index}: {error}"),
        }
        index
    }

    /// The new connections recorded so far (in the order they ended).
    pub fn new_connections(&self) -> Vec<Attempt> {
        lock(&self.new_connections).clone()
    }

    /// The new connections that started at or after `since`.
    pub fn new_connections_since(&self, since: Instant) -> Vec<Attempt> {
        lock(&self.new_connections)
            .iter()
            .filter(|a| a.start >= since)
            .cloned()
            .collect()
    }

    /// The long-lived connections and their replies so far.
    pub fn long_lived(&self) -> Vec<LongLived> {
        lock(&self.long_lived)
            .iter()
            .map(|record| lock(record).clone())
            .collect()
    }

    /// Stops every thread, waits for them and returns the records.
    pub fn stop(self) -> LoadRecords {
        self.halt();
        LoadRecords {
            new_connections: self.new_connections(),
            long_lived: self.long_lived(),
        }
    }

    fn halt(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for thread in threads {
            if thread.join().is_err() {
                eprintln!("load: a load thread panicked");
            }
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

fn long_lived_failure(error: &anyhow::Error) -> Failure {
    let io = error.chain().find_map(|e| e.downcast_ref::<io::Error>());
    let text = format!("{error:#}");
    let (stage, kind) = match io {
        Some(io) if text.starts_with("cannot send") => (Stage::Send, io.kind()),
        Some(io) => (Stage::Receive, io.kind()),
        None if text.contains("in time") => (Stage::Receive, ErrorKind::TimedOut),
        None => (Stage::Receive, ErrorKind::UnexpectedEof),
    };
    Failure { stage, kind, text }
}

/// Sleeps until `deadline` in short steps, returning early when `stop` is set.
fn sleep_until(deadline: Instant, stop: &AtomicBool) {
    const STEP: Duration = Duration::from_millis(20);
    loop {
        let now = Instant::now();
        if now >= deadline || stop.load(Ordering::Relaxed) {
            return;
        }
        std::thread::sleep((deadline - now).min(STEP));
    }
}

/// One new connection from the current thread's namespace: connect within `timeout`, send
/// [`REQUEST_LINE`], read the identity line, close.
pub fn connect_once_here(target: SocketAddr, timeout: Duration) -> Attempt {
    let start = Instant::now();
    let result = exchange(target, timeout);
    Attempt {
        start,
        end: Instant::now(),
        result,
    }
}

/// [`connect_once_here`] from inside `namespace`.
pub fn connect_once(namespace: &NetNs, target: SocketAddr, timeout: Duration) -> Result<Attempt> {
    namespace
        .try_run(|| connect_once_here(target, timeout))
        .context("one connection from the namespace")
}

fn exchange(target: SocketAddr, timeout: Duration) -> Result<String, Failure> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .map_err(|e| Failure::io(Stage::Connect, &e))?;
    let setup = stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .and_then(|()| stream.set_nodelay(true));
    setup.map_err(|e| Failure::io(Stage::Connect, &e))?;
    (&stream)
        .write_all(REQUEST_LINE.as_bytes())
        .map_err(|e| Failure::io(Stage::Send, &e))?;
    let mut answer = String::new();
    let length = BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| Failure::io(Stage::Receive, &e))?;
    if length == 0 || !answer.ends_with('\n') {
        return Err(Failure {
            stage: Stage::Receive,
            kind: ErrorKind::UnexpectedEof,
            text: format!("Receive: closed after {answer:?} without a full answer line"),
        });
    }
    answer.pop();
    Ok(answer)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn attempt(start_ms: u64, end_ms: u64, origin: Instant) -> Attempt {
        Attempt {
            start: origin + Duration::from_millis(start_ms),
            end: origin + Duration::from_millis(end_ms),
            result: Ok("x".into()),
        }
    }

    #[test]
    fn overlap_is_inclusive_at_both_ends() {
        let origin = Instant::now();
        let window = (
            origin + Duration::from_millis(10),
            origin + Duration::from_millis(20),
        );
        assert!(attempt(5, 10, origin).overlaps(window.0, window.1));
        assert!(attempt(20, 25, origin).overlaps(window.0, window.1));
        assert!(attempt(12, 15, origin).overlaps(window.0, window.1));
        assert!(!attempt(1, 9, origin).overlaps(window.0, window.1));
        assert!(!attempt(21, 30, origin).overlaps(window.0, window.1));
    }

    #[test]
    fn a_long_lived_connection_that_changed_backend_is_seen() {
        let origin = Instant::now();
        let mut record = LongLived {
            index: 0,
            expected: "a".into(),
            local_address: None,
            added: origin,
            replies: vec![attempt(0, 1, origin)],
        };
        record.replies[0].result = Ok("a".into());
        assert!(record.alive() && record.moved().is_empty());
        record.replies.push(Attempt {
            result: Ok("b".into()),
            ..attempt(2, 3, origin)
        });
        assert_eq!(record.moved().len(), 1);
        record.replies.push(Attempt {
            result: Err(Failure {
                stage: Stage::Receive,
                kind: ErrorKind::UnexpectedEof,
                text: "closed".into(),
            }),
            ..attempt(4, 5, origin)
        });
        assert!(!record.alive());
        assert_eq!(
            record.last_answer(),
            Some(origin + Duration::from_millis(3))
        );
    }
}
