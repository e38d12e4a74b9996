//! Replay protection for one peer's datagrams: (session, seq) pairs are accepted once.
//!
//! A peer numbers its datagrams from 0 in each session, and a session is its start time, so a
//! restarted peer has a larger one. UDP reorders, so a seq below the highest seen is accepted if
//! it is within the last [`WINDOW`] seqs and was not seen before (the IPsec anti-replay window).

/// How many seqs, counting the highest, are remembered.
pub const WINDOW: u64 = 1024;
const WORDS: usize = (WINDOW / 64) as usize;

/// The state of one peer. Starts empty: the first datagram of any session is accepted.
#[derive(Debug, Clone, Default)]
pub struct ReplayGuard {
    state: Option<State>,
}

#[derive(Debug, Clone)]
struct State {
    session: u64,
    highest: u64,
    /// Bit `seq % WINDOW` is set when that seq, one of the last WINDOW, was seen.
    seen: [u64; WORDS],
}

impl State {
    fn new(session: u64, seq: u64) -> State {
        let mut state = State {
            session,
            highest: seq,
            seen: [0; WORDS],
        };
        state.set(seq);
        state
    }

    fn bit(seq: u64) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1 << (i % 64))
    }

    fn is_set(&self, seq: u64) -> bool {
        let (word, mask) = Self::bit(seq);
        self.seen[word] & mask != 0
    }

    fn set(&mut self, seq: u64) {
        let (word, mask) = Self::bit(seq);
        self.seen[word] |= mask;
    }

    fn clear(&mut self, seq: u64) {
        let (word, mask) = Self::bit(seq);
        self.seen[word] &= !mask;
    }
}

impl ReplayGuard {
    pub fn new() -> ReplayGuard {
        ReplayGuard::default()
    }

    /// Would (session, seq) be accepted? Changes nothing, so a caller can run its other checks
    /// before [`ReplayGuard::record`].
    pub fn check(&self, session: u64, seq: u64) -> bool {
        let Some(state) = &self.state else {
            return true;
        };
        if session != state.session {
            // An older session is a replay of a previous run of the peer (or a clock step back,
            // which we cannot tell apart); a newer one is a restart.
            return session > state.session;
        }
        if seq > state.highest {
            return true;
        }
        // `highest - seq` cannot underflow here; WINDOW - 1 behind the highest is the oldest kept.
        state.highest - seq < WINDOW && !state.is_set(seq)
    }

    /// Marks (session, seq) as seen. Call only after [`ReplayGuard::check`] accepted it: a
    /// refused pair would move the state (a refused older session would reset it).
    pub fn record(&mut self, session: u64, seq: u64) {
        match &mut self.state {
            Some(state) if state.session == session => {
                if seq > state.highest {
                    // The bits of the seqs the window slides over belong to seqs WINDOW older:
                    // clear them (all of them at most once, for a jump of WINDOW or more).
                    let skipped = (seq - state.highest).min(WINDOW);
                    for s in (seq - skipped + 1)..=seq {
                        state.clear(s);
                    }
                    state.highest = seq;
                }
                state.set(seq);
            }
            _ => self.state = Some(State::new(session, seq)),
        }
    }

    /// [`ReplayGuard::check`], then [`ReplayGuard::record`] if accepted.
    pub fn check_and_record(&mut self, session: u64, seq: u64) -> bool {
        let accepted = self.check(session, seq);
        if accepted {
            self.record(session, seq);
        }
        accepted
    }

    /// The peer's current session, once a datagram was accepted.
    pub fn session(&self) -> Option<u64> {
        self.state.as_ref().map(|s| s.session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(guard: &mut ReplayGuard, session: u64, seq: u64) {
        assert!(
            guard.check_and_record(session, seq),
            "({session}, {seq}) refused; state {guard:?}"
        );
    }

    fn refuse(guard: &mut ReplayGuard, session: u64, seq: u64) {
        assert!(
            !guard.check_and_record(session, seq),
            "({session}, {seq}) accepted; state {guard:?}"
        );
    }

    #[test]
    fn first_datagram_of_any_session_is_accepted() {
        accept(&mut ReplayGuard::new(), 7, 0);
        accept(&mut ReplayGuard::new(), 7, 123_456);
        accept(&mut ReplayGuard::new(), 0, u64::MAX);
    }

    #[test]
    fn in_order_then_duplicates_refused() {
        let mut g = ReplayGuard::new();
        for seq in 0..3000 {
            accept(&mut g, 1, seq);
        }
        refuse(&mut g, 1, 2999);
        refuse(&mut g, 1, 2500);
        refuse(&mut g, 1, 0);
    }

    #[test]
    fn reordering_within_the_window_is_accepted_once() {
        let mut g = ReplayGuard::new();
        accept(&mut g, 1, 0);
        accept(&mut g, 1, 10);
        for seq in (1..10).rev() {
            accept(&mut g, 1, seq);
        }
        for seq in 0..=10 {
            refuse(&mut g, 1, seq);
        }
        accept(&mut g, 1, 11);
    }

    #[test]
    fn window_edge() {
        let mut g = ReplayGuard::new();
        accept(&mut g, 1, 5000);
        // 5000 - 1023 is the oldest the window holds; one more is too old.
        refuse(&mut g, 1, 5000 - WINDOW);
        assert!(g.check(1, 5000 - (WINDOW - 1)));
        accept(&mut g, 1, 5000 - (WINDOW - 1));
        refuse(&mut g, 1, 5000 - (WINDOW - 1));
        // Moving up by one drops that oldest seq out of the window: still refused (too old now).
        accept(&mut g, 1, 5001);
        refuse(&mut g, 1, 5000 - (WINDOW - 1));
        // The new oldest, never seen, is accepted.
        accept(&mut g, 1, 5001 - (WINDOW - 1));
    }

    #[test]
    fn sliding_clears_bits_of_seqs_that_left_the_window() {
        // Seq 1024 shares seq 0's bit: seeing 0 must not make a fresh 1024 look seen.
        let mut g = ReplayGuard::new();
        accept(&mut g, 1, 0);
        accept(&mut g, 1, 1000);
        accept(&mut g, 1, WINDOW);
        accept(&mut g, 1, WINDOW + 1000 - 1);
        refuse(&mut g, 1, 1000);
        accept(&mut g, 1, 1001);
    }

    #[test]
    fn large_jump_forgets_everything_older() {
        let mut g = ReplayGuard::new();
        for seq in 0..100 {
            accept(&mut g, 1, seq);
        }
        let far = 1_000_000;
        accept(&mut g, 1, far);
        refuse(&mut g, 1, 99);
        // Seqs in the new window were never seen, even where their bits held old seqs.
        for seq in (far - (WINDOW - 1))..far {
            accept(&mut g, 1, seq);
        }
        refuse(&mut g, 1, far);
        accept(&mut g, 1, u64::MAX);
        refuse(&mut g, 1, u64::MAX);
    }

    #[test]
    fn older_session_refused_newer_resets() {
        let mut g = ReplayGuard::new();
        accept(&mut g, 10, 500);
        refuse(&mut g, 9, 0);
        refuse(&mut g, 9, 501);
        assert_eq!(g.session(), Some(10), "a refused session changed the state");
        // A restart: numbering starts again from 0.
        accept(&mut g, 11, 0);
        assert_eq!(g.session(), Some(11));
        refuse(&mut g, 10, 501);
        refuse(&mut g, 11, 0);
        accept(&mut g, 11, 1);
    }

    #[test]
    fn check_changes_nothing() {
        let mut g = ReplayGuard::new();
        assert!(g.check(1, 0));
        assert!(g.check(1, 0), "check recorded");
        accept(&mut g, 1, 0);
        assert!(!g.check(1, 0));
        assert!(g.check(2, 0));
        refuse(&mut g, 1, 0);
    }
}
