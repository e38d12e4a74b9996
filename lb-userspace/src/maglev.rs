//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), the per-VIP rings the XDP program indexes with
//! `flow_hash % M` to choose a new flow's backend.
//!
//! Why Maglev: every backend gets an almost equal (here: weight-proportional) share of the M
//! slots, and when a backend leaves, almost only its own slots change owner, so flows of the
//! other backends that are not in the connection table (a new LB, an evicted entry) still land
//! on the same backend.
//!
//! Each backend has a preference list, a permutation of the slots derived from two hashes of its
//! key: `permutation[j] = (offset + j * skip) % M` with `offset = h1(key) % M` and
//! `skip = h2(key) % (M - 1) + 1`. M prime makes every `skip` coprime with M, so each list
//! visits every slot exactly once. Backends take turns claiming the next slot of their list that
//! is still free, until all are taken.
//!
//! Weights: in each round every backend adds its weight to a credit, and claims one slot when
//! its credit reaches the largest weight (then pays that much back). A backend of the largest
//! weight claims every round, one of half that weight every other round, so slot counts are
//! proportional to weights.
//!
//! The hashes are our own (FNV-1a 64 followed by MurmurHash3's 64-bit finaliser) rather than
//! std's `DefaultHasher`, whose algorithm may change between Rust versions: the same config
//! must give the same table from any build of the daemon on any machine.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use lb_common::NO_BACKEND;

/// One candidate owner of ring slots.
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend<'a> {
    /// Stable identity (e.g. the backend address bytes and the VIP name): it alone decides the
    /// backend's preference list, so it must not change while the backend stays configured, and
    /// must not depend on the backend's position in the list.
    pub key: &'a [u8],
    /// Relative share of the slots; 0 keeps the backend out of the table.
    pub weight: u32,
}

/// A backend's preference list in a table of one size, as [`build_table`] derives it from
/// the backend's key: a caller that builds often for the same backends keeps these
/// ([`build_table_from_lists`]) instead of hashing every key for every build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreferenceList {
    offset: u32,
    skip: u32,
    ring_size: u32,
}

impl PreferenceList {
    /// The list of the backend with stable identity `key` (see [`MaglevBackend::key`]).
    pub fn of(key: &[u8], ring_size: u32) -> Self {
        let (offset, skip) = permutation_parameters(key, ring_size);
        PreferenceList {
            offset,
            skip,
            ring_size,
        }
    }

    /// The table size the list is for.
    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }
}

/// Seeds of the two preference-list hashes. Changing them reshuffles every ring.
const OFFSET_SEED: u64 = 0x5bd1_e995_0000_0001;
const SKIP_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Builds the lookup table of `ring_size` slots for `backends`.
///
/// Each entry is the index into `backends` of the slot's owner, or [`NO_BACKEND`] everywhere if
/// no backend has a weight above 0. The result depends only on the keys, weights and order of
/// `backends` and on `ring_size`; a backend of weight 0 yields exactly the table of the list
/// without it (with indices of the original list).
///
/// Cost: O(M log N) heap operations plus, as in the paper, about M ln M probes of taken slots,
/// of which the last ~√M/2 slots' share (about half) is replaced by ~M/8 scanned entries (see
/// [`Filler`]); independent of how skewed the weights are.
///
/// # Panics
///
/// If `ring_size` is not prime (callers validate it; see [`is_prime`]), or if there are
/// `NO_BACKEND` or more backends (their indices could not be told from an empty slot).
pub fn build_table(backends: &[MaglevBackend<'_>], ring_size: u32) -> Vec<u32> {
    let mut table = Vec::new();
    build_table_into(backends, ring_size, &mut table);
    table
}

/// [`build_table`] into `table` (resized to `ring_size`), so a caller that builds often reuses
/// one buffer instead of allocating (and page-faulting in) a fresh table each time.
///
/// # Panics
///
/// As [`build_table`].
pub fn build_table_into(backends: &[MaglevBackend<'_>], ring_size: u32, table: &mut Vec<u32>) {
    let lists: Vec<PreferenceList> = backends
        .iter()
        .map(|backend| PreferenceList::of(backend.key, ring_size))
        .collect();
    let weights: Vec<u32> = backends.iter().map(|backend| backend.weight).collect();
    build_table_with(&lists, &weights, ring_size, table, Lanes::IfAvailable);
}

/// [`build_table_into`] for the backends whose preference lists (from their keys, for this
/// `ring_size`) are `lists`, with `weights`: the same table.
///
/// # Panics
///
/// As [`build_table`], and if `lists` and `weights` differ in length or a list is for another
/// ring size.
pub fn build_table_from_lists(
    lists: &[PreferenceList],
    weights: &[u32],
    ring_size: u32,
    table: &mut Vec<u32>,
) {
    build_table_with(lists, weights, ring_size, table, Lanes::IfAvailable);
}

/// Whether an equal-weights build may use [`Filler::claim_in_batches`] (tests compare both).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lanes {
    IfAvailable,
    #[cfg_attr(not(test), allow(dead_code))]
    Never,
}

fn build_table_with(
    lists: &[PreferenceList],
    weights: &[u32],
    ring_size: u32,
    table: &mut Vec<u32>,
    lanes: Lanes,
) {
    assert!(
        is_prime(ring_size),
        "Maglev ring size {ring_size} is not prime"
    );
    assert!(
        lists.len() < NO_BACKEND as usize,
        "too many Maglev backends: {}",
        lists.len()
    );
    assert_eq!(lists.len(), weights.len(), "a weight for each backend");
    assert!(
        lists.iter().all(|list| list.ring_size == ring_size),
        "preference lists of another ring size"
    );

    table.clear();
    table.resize(ring_size as usize, NO_BACKEND);
    let max_weight = weights.iter().copied().max().unwrap_or(0);
    if max_weight == 0 {
        return;
    }

    let mut candidates: Vec<Candidate> = lists
        .iter()
        .zip(weights)
        .enumerate()
        .filter(|(_, (_, weight))| **weight > 0)
        .map(|(index, (list, &weight))| Candidate::new(index as u32, list, weight))
        .collect();

    let mut filler = Filler::new(table, ring_size);
    if candidates.iter().all(|c| c.weight == u64::from(max_weight)) {
        // Equal weights (the common case): every backend claims exactly once per round, in
        // order, so the round loop needs no schedule.
        filler.fill_round_robin(&mut candidates, lanes);
        return;
    }

    // Instead of visiting every backend in every round (N × rounds steps, which is N × M when
    // one weight dwarfs the others), schedule each backend's next claim.
    let mut schedule = ClaimSchedule::new(ring_size, candidates.len());
    for (position, candidate) in candidates.iter_mut().enumerate() {
        schedule.push(candidate.advance_to_next_claim(0, max_weight), position);
    }
    let mut free = None;
    while let Some((round, position)) = schedule.pop() {
        let candidate = &mut candidates[position];
        if filler.free_slots > filler.tail_slots {
            filler.claim_by_probing(candidate);
        } else {
            let free = free.get_or_insert_with(|| filler.taken.free_slots(ring_size));
            filler.claim_by_scanning(free, candidate);
        }
        if filler.free_slots == 0 {
            break;
        }
        let next_round = candidate.advance_to_next_claim(round, max_weight);
        schedule.push(next_round, position);
    }
}

/// Hands out the slots of a table being built.
///
/// Most probes of a build happen at the end: with k slots free, finding one costs about M / k
/// probes, so the last few hundred slots would take about half of the ~M ln M probes. From
/// then on a claim instead scans the few free slots and takes the one that comes first in the
/// backend's list: the same slot, since every slot the backend's list passed is taken for good.
struct Filler<'t> {
    table: &'t mut [u32],
    taken: TakenSlots,
    ring_size: u32,
    free_slots: usize,
    /// Claims scan the free slots once there are at most this many.
    tail_slots: usize,
    modulus: Modulus,
}

impl<'t> Filler<'t> {
    fn new(table: &'t mut [u32], ring_size: u32) -> Self {
        Filler {
            free_slots: table.len(),
            table,
            taken: TakenSlots::new(ring_size),
            ring_size,
            // Around √M / 2 free slots, a scan of them (a few multiplications each) costs about
            // as much as the M / k probes it replaces (measured: √M / 4 and √M are slower).
            tail_slots: (ring_size.isqrt() / 2) as usize,
            modulus: Modulus::new(ring_size),
        }
    }

    /// The round loop for equal weights: each candidate in turn claims its next free slot.
    ///
    /// While about half to seven eighths of the slots are taken, a claim probes a few slots and
    /// whether the next one is free is a coin flip, so the branch of the probe loop is
    /// mispredicted about once per claim; there, with AVX2, [`Filler::claim_in_batches`] probes
    /// the lists of many consecutive turns at once instead. Before, most first probes hit
    /// (predictable), and after, the probes of one claim dominate, which the scalar loop walks at
    /// two cycles each.
    fn fill_round_robin(&mut self, candidates: &mut [Candidate], lanes: Lanes) {
        let mut position = 0;
        #[cfg(target_arch = "x86_64")]
        if lanes == Lanes::IfAvailable
            && candidates.len() >= 8
            && self.ring_size < 1 << 31
            && is_x86_feature_detected!("avx2")
        {
            let ring_size = self.ring_size as usize;
            // Measured: starting at 3/4 taken, or stopping at 15/16 or 31/32 taken, is slower.
            let batches_from = (ring_size / 2).max(self.tail_slots);
            let batches_to = (ring_size / 8).max(self.tail_slots);
            position = self.claim_by_probing_until(candidates, position, batches_from);
            if self.free_slots > batches_to {
                position = if candidates.len() >= 16 {
                    // SAFETY: AVX2 is available (checked above), M < 2^31 and there are at
                    // least 16 candidates.
                    unsafe { self.claim_in_batches::<2>(candidates, position, batches_to) }
                } else {
                    // SAFETY: as above, with at least 8 candidates.
                    unsafe { self.claim_in_batches::<1>(candidates, position, batches_to) }
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = lanes;
        position = self.claim_by_probing_until(candidates, position, self.tail_slots);
        let mut free = self.taken.free_slots(self.ring_size);
        while !free.is_empty() {
            self.claim_by_scanning(&mut free, &mut candidates[position]);
            position = next_position(position, candidates.len());
        }
    }

    /// Turns of the round loop from `position` on, claiming by probing while more than
    /// `stop_at` slots are free. Returns the position of the next turn.
    fn claim_by_probing_until(
        &mut self,
        candidates: &mut [Candidate],
        mut position: usize,
        stop_at: usize,
    ) -> usize {
        while self.free_slots > stop_at {
            self.claim_by_probing(&mut candidates[position]);
            position = next_position(position, candidates.len());
        }
        position
    }

    /// Turns of the round loop from `position` on, in batches of `8 * V` consecutive turns
    /// (distinct candidates, since there are at least that many), while more than `stop_at`
    /// slots are free. Returns the position of the next turn.
    ///
    /// Every lane of a batch walks its candidate's list against the taken slots as they were
    /// when the batch began, without a branch per probe, until every lane has found a free slot
    /// (one mispredicted branch per batch instead of about one per claim). Then the lanes claim
    /// in turn order. The slots a lane passed were taken when the batch began and still are
    /// (slots are never given back), so its slot is the first free one of its list unless an
    /// earlier lane of the same batch just took it; then the claim goes on down the list from
    /// there. Either way it is the slot the plain loop would claim.
    ///
    /// # Safety
    ///
    /// AVX2 must be available, M below 2^31 (lane sums of two slots must not overflow 32 bits)
    /// and `candidates.len() >= 8 * V`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    #[allow(clippy::needless_range_loop)] // `v` indexes several lane arrays in step
    unsafe fn claim_in_batches<const V: usize>(
        &mut self,
        candidates: &mut [Candidate],
        mut position: usize,
        stop_at: usize,
    ) -> usize {
        use std::arch::x86_64::*;

        /// Lane values of one batch, aligned for vector stores.
        #[repr(align(32))]
        struct LaneValues([u32; 32]);

        let n = candidates.len();
        let lanes = 8 * V;
        assert!(V <= 4 && n >= lanes && self.ring_size < 1 << 31);
        let ring_size = self.ring_size;
        // The lists' state as arrays, with the first `lanes` entries repeated at the end so
        // that a batch wrapping around the candidate list still loads consecutive entries.
        let mut next: Vec<u32> = (0..n + lanes)
            .map(|i| candidates[i % n].next_slot)
            .collect();
        let skip: Vec<u32> = (0..n + lanes).map(|i| candidates[i % n].skip).collect();
        let all_found = ((1_u64 << lanes) - 1) as u32;
        let m = _mm256_set1_epi32(ring_size as i32);
        let low_bits = _mm256_set1_epi32(31);
        let one = _mm256_set1_epi32(1);
        let zero = _mm256_setzero_si256();
        // The bitset as 32-bit words (little-endian: bit `slot % 32` of word `slot / 32`).
        let words = self.taken.words.as_ptr().cast::<i32>();
        let mut found_slots = LaneValues([0; 32]);
        'batches: loop {
            let mut probe = [zero; V];
            let mut step = [zero; V];
            let mut found = [zero; V];
            let mut found_mask = [zero; V];
            for v in 0..V {
                // SAFETY: position < n, so position + 8 * V <= n + lanes entries exist.
                unsafe {
                    probe[v] = _mm256_loadu_si256(next.as_ptr().add(position + 8 * v).cast());
                    step[v] = _mm256_loadu_si256(skip.as_ptr().add(position + 8 * v).cast());
                }
            }
            loop {
                let mut done = 0;
                for v in 0..V {
                    // SAFETY: every probed slot is below M, so its word index is below
                    // ⌈M / 32⌉ <= 2 · words.len(): the gather stays inside the bitset.
                    let word = unsafe {
                        _mm256_i32gather_epi32::<4>(words, _mm256_srli_epi32::<5>(probe[v]))
                    };
                    let bit = _mm256_srlv_epi32(word, _mm256_and_si256(probe[v], low_bits));
                    let free = _mm256_cmpeq_epi32(_mm256_and_si256(bit, one), zero);
                    let first = _mm256_andnot_si256(found_mask[v], free);
                    found[v] = _mm256_blendv_epi8(found[v], probe[v], first);
                    found_mask[v] = _mm256_or_si256(found_mask[v], free);
                    // (probe + skip) % M: both below M < 2^31, and the unsigned minimum picks
                    // the sum minus M unless that wrapped.
                    let sum = _mm256_add_epi32(probe[v], step[v]);
                    probe[v] = _mm256_min_epu32(sum, _mm256_sub_epi32(sum, m));
                    done |=
                        (_mm256_movemask_ps(_mm256_castsi256_ps(found_mask[v])) as u32) << (8 * v);
                }
                if done == all_found {
                    break;
                }
            }
            for v in 0..V {
                // SAFETY: found_slots holds 32 >= 8 * V values and is aligned to 32 bytes.
                unsafe {
                    _mm256_store_si256(found_slots.0.as_mut_ptr().add(8 * v).cast(), found[v]);
                }
            }
            for &found in &found_slots.0[..lanes] {
                let skip = skip[position];
                let mut slot = found;
                while self.taken.contains(slot as usize) {
                    slot = add_modulo(slot, skip, ring_size);
                }
                let after = add_modulo(slot, skip, ring_size);
                next[position] = after;
                if position < lanes {
                    next[position + n] = after;
                }
                self.give(slot as usize, candidates[position].index);
                position = next_position(position, n);
                if self.free_slots <= stop_at {
                    break 'batches;
                }
            }
        }
        for (candidate, &next_slot) in candidates.iter_mut().zip(&next) {
            candidate.next_slot = next_slot;
        }
        position
    }

    fn claim_by_probing(&mut self, candidate: &mut Candidate) {
        let slot = candidate.next_free_slot(&self.taken, self.ring_size);
        self.give(slot, candidate.index);
    }

    fn claim_by_scanning(&mut self, free: &mut Vec<u32>, candidate: &mut Candidate) {
        let slot = candidate.first_of(free, &self.modulus);
        self.give(slot, candidate.index);
    }

    fn give(&mut self, slot: usize, owner: u32) {
        self.taken.take(slot);
        self.table[slot] = owner;
        self.free_slots -= 1;
    }
}

/// The pending claims, one per backend, yielded in the order of the round-by-round loop: by
/// round, then by position in the backend list.
struct ClaimSchedule {
    /// `round << 32 | position`, so the heap compares one integer.
    heap: BinaryHeap<Reverse<u64>>,
    /// The table is full by round M, because a backend of the largest weight claims in every
    /// round; a claim due later never happens. This also keeps rounds within 32 bits.
    last_round: u64,
}

impl ClaimSchedule {
    fn new(ring_size: u32, backends: usize) -> Self {
        ClaimSchedule {
            heap: BinaryHeap::with_capacity(backends),
            last_round: u64::from(ring_size),
        }
    }

    /// `position` is below `NO_BACKEND`, so it fits in 32 bits.
    fn push(&mut self, round: u64, position: usize) {
        if round <= self.last_round {
            self.heap.push(Reverse(round << 32 | position as u64));
        }
    }

    fn pop(&mut self) -> Option<(u64, usize)> {
        self.heap
            .pop()
            .map(|Reverse(key)| (key >> 32, (key & u64::from(u32::MAX)) as usize))
    }
}

/// A backend with weight > 0 while its table is being built.
struct Candidate {
    /// Index into the caller's `backends`.
    index: u32,
    weight: u64,
    /// Credit left after the last claim, always below the largest weight.
    credit: u64,
    /// `permutation[j]` for the next `j` to try, kept incrementally: adding `skip` modulo M
    /// walks the same sequence as `(offset + j * skip) % M` without a multiplication.
    next_slot: u32,
    skip: u32,
    /// `skip`'s inverse modulo M, or 0 until [`Candidate::first_of`] needs it.
    inverse_skip: u32,
}

impl Candidate {
    fn new(index: u32, list: &PreferenceList, weight: u32) -> Self {
        Candidate {
            index,
            weight: u64::from(weight),
            credit: 0,
            next_slot: list.offset,
            skip: list.skip,
            inverse_skip: 0,
        }
    }

    /// Given that this backend last claimed in `round`, the round of its next claim: the first
    /// in which `credit + rounds * weight` reaches `max_weight`. Pays for that claim.
    fn advance_to_next_claim(&mut self, round: u64, max_weight: u32) -> u64 {
        let max_weight = u64::from(max_weight);
        let rounds = (max_weight - self.credit).div_ceil(self.weight);
        self.credit = self.credit + rounds * self.weight - max_weight;
        round + rounds
    }

    /// The first still-free slot of this backend's preference list, consuming the list up to it.
    /// Terminates while any slot is free, because the list visits every slot.
    fn next_free_slot(&mut self, taken: &TakenSlots, ring_size: u32) -> usize {
        // The walk is one dependency chain, so its latency bounds the many probes of a claim
        // late in the build: adding `skip - M` (modulo 2^32) carries exactly when
        // `slot + skip >= M`, so the carry of that addition picks the result (two cycles per
        // step instead of four for add, compare, select, subtract).
        let skip_minus_m = self.skip.wrapping_sub(ring_size);
        let mut next = self.next_slot;
        let slot = loop {
            let slot = next;
            let (sum, carry) = slot.overflowing_add(skip_minus_m);
            next = if carry {
                sum
            } else {
                sum.wrapping_add(ring_size)
            };
            if !taken.contains(slot as usize) {
                break slot;
            }
        };
        self.next_slot = next;
        slot as usize
    }

    /// The slot of `free` (all the free slots) that comes first in this backend's list, removed
    /// from `free`. Every slot the list passed before `next_slot` is taken, so that is the
    /// same slot [`Candidate::next_free_slot`] would find. Leaves `next_slot` as it is: it
    /// still precedes every free slot.
    fn first_of(&mut self, free: &mut Vec<u32>, modulus: &Modulus) -> usize {
        let ring_size = modulus.divisor as u32;
        if self.inverse_skip == 0 {
            self.inverse_skip = inverse_modulo(self.skip, ring_size);
        }
        // A slot's distance down the list from `next_slot` is `(slot - next_slot) / skip`
        // modulo M, i.e. `slot * inverse + shift` with the `shift` below; distances of distinct
        // slots differ, so the smallest one, with its index below it, is unique.
        let inverse = u64::from(self.inverse_skip);
        let shift = modulus.reduce(u64::from(ring_size - self.next_slot) * inverse);
        let first = free
            .iter()
            .enumerate()
            .map(|(index, &slot)| {
                // slot * inverse + shift < M² + M < 2^64.
                let steps = modulus.reduce(u64::from(slot) * inverse + shift);
                steps << 32 | index as u64
            })
            .min()
            .expect("a free slot is left");
        free.swap_remove((first & u64::from(u32::MAX)) as usize) as usize
    }
}

/// The turn after `position` in a round of `n` candidates.
fn next_position(position: usize, n: usize) -> usize {
    if position + 1 == n { 0 } else { position + 1 }
}

/// `(a + b) % m` for `a, b < m`: one subtraction, not a division (there are about M ln M
/// probes per build).
fn add_modulo(a: u32, b: u32, m: u32) -> u32 {
    let sum = u64::from(a) + u64::from(b);
    (if sum >= u64::from(m) {
        sum - u64::from(m)
    } else {
        sum
    }) as u32
}

/// Division by a u32 M known at run time, by a multiplication (Barrett reduction).
struct Modulus {
    divisor: u64,
    /// ⌊(2^64 - 1) / M⌋.
    reciprocal: u64,
}

impl Modulus {
    fn new(divisor: u32) -> Self {
        Modulus {
            divisor: u64::from(divisor),
            reciprocal: u64::MAX / u64::from(divisor),
        }
    }

    /// `value % M`, for `value < M · (M + 1)`. The reciprocal is short of 2^64 / M by less
    /// than 1 + 1/M, which makes the estimated quotient short by less than (M + 1)² / 2^64 ≤ 1
    /// before rounding down: it is ⌊value / M⌋ or one less, so one correction.
    fn reduce(&self, value: u64) -> u64 {
        let quotient = ((u128::from(value) * u128::from(self.reciprocal)) >> 64) as u64;
        let rest = value - quotient * self.divisor;
        // Not an `if`: a branch here would be mispredicted half the time.
        rest.min(rest.wrapping_sub(self.divisor))
    }
}

/// `x` with `x · value ≡ 1 (mod modulus)`, for `value` in 1..modulus and `modulus` prime
/// (extended Euclid).
fn inverse_modulo(value: u32, modulus: u32) -> u32 {
    let (mut r0, mut r1) = (modulus, value);
    let (mut t0, mut t1) = (0_i64, 1_i64);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - i64::from(q) * t1);
    }
    debug_assert_eq!(r0, 1, "{value} has no inverse modulo {modulus}");
    t0.rem_euclid(i64::from(modulus)) as u32
}

/// Which slots have an owner: one bit per slot, so the ~M ln M random probes of a build touch
/// M/8 bytes (8 KiB at M = 65537, which stays in L1) instead of the 4·M-byte table.
struct TakenSlots {
    words: Vec<u64>,
}

impl TakenSlots {
    fn new(ring_size: u32) -> Self {
        TakenSlots {
            words: vec![0; (ring_size as usize).div_ceil(64)],
        }
    }

    fn contains(&self, slot: usize) -> bool {
        self.words[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn take(&mut self, slot: usize) {
        self.words[slot / 64] |= 1 << (slot % 64);
    }

    /// The free slots, in increasing order.
    fn free_slots(&self, ring_size: u32) -> Vec<u32> {
        let mut free = Vec::new();
        for (word_index, &word) in self.words.iter().enumerate() {
            let mut bits = !word;
            while bits != 0 {
                free.push(word_index as u32 * 64 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        // The last word's bits past the ring are never taken.
        free.retain(|&slot| slot < ring_size);
        free
    }
}

/// `(offset, skip)` of `key`'s preference list in a table of `ring_size` (prime) slots.
fn permutation_parameters(key: &[u8], ring_size: u32) -> (u32, u32) {
    let m = u64::from(ring_size);
    let offset = stable_hash(OFFSET_SEED, key) % m;
    // A ring of 2 slots leaves skip = 1; `% (m - 1)` is never a division by zero since m >= 2.
    let skip = stable_hash(SKIP_SEED, key) % (m - 1) + 1;
    (offset as u32, skip as u32)
}

/// A seeded 64-bit hash that is the same on every platform and Rust version. FNV-1a alone mixes
/// poorly into the low bits (a multiplication only carries upwards), and the low bits are what
/// `% M` keeps, so its result goes through MurmurHash3's finaliser, which folds the high bits
/// down.
fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    fmix64(fnv1a64(FNV_OFFSET_BASIS ^ seed, bytes))
}

/// A digest of a table given as the sequence of its slots' owners (each owner's stable key, an
/// empty slice for an empty slot): equal digests mean equal tables, from any build on any
/// machine. Owners are separated, so ("ab", "c") and ("a", "bc") differ.
pub fn table_digest<'a>(owners: impl IntoIterator<Item = &'a [u8]>) -> u64 {
    let hash = owners
        .into_iter()
        .fold(FNV_OFFSET_BASIS ^ DIGEST_SEED, |hash, owner| {
            fnv1a64(fnv1a64(hash, owner), &[0xff])
        });
    fmix64(hash)
}

/// Seed of [`table_digest`].
const DIGEST_SEED: u64 = 0x6c62_5f72_696e_6721;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a64(start: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(start, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// MurmurHash3's 64-bit finaliser: every input bit affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// Whether `n` is prime (trial division: at most ~22k steps for any `u32`, run once per config).
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) || n.is_multiple_of(3) {
        return false;
    }
    // Every prime above 3 is 6k ± 1.
    let n = u64::from(n);
    let mut divisor: u64 = 5;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) || n.is_multiple_of(divisor + 2) {
            return false;
        }
        divisor += 6;
    }
    true
}

/// How many slots of `table` each of `backend_count` backends owns ([`NO_BACKEND`] slots are not
/// counted). For tests, `lb` status output and metrics.
///
/// # Panics
///
/// If an entry is neither [`NO_BACKEND`] nor below `backend_count`.
pub fn ring_shares(table: &[u32], backend_count: usize) -> Vec<usize> {
    let mut shares = vec![0; backend_count];
    for &owner in table.iter().filter(|&&owner| owner != NO_BACKEND) {
        shares[owner as usize] += 1;
    }
    shares
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u32 = 65537;

    /// Keys shaped like the daemon's: address bytes followed by the VIP name.
    fn keys(count: usize) -> Vec<Vec<u8>> {
        (0..count)
            .map(|i| {
                let mut key = vec![10, 0, (i / 256) as u8, (i % 256) as u8];
                key.extend_from_slice(b"web");
                key
            })
            .collect()
    }

    /// Keys as the daemon makes them: backend address strings.
    fn address_keys(count: u32) -> Vec<Vec<u8>> {
        (0..count)
            .map(|j| {
                format!("10.{}.{}.{}", 50 + j / 40_000, j / 200 % 200, j % 200 + 1).into_bytes()
            })
            .collect()
    }

    fn backends<'a>(keys: &'a [Vec<u8>], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .map(|(key, &weight)| MaglevBackend { key, weight })
            .collect()
    }

    /// Asserts every backend's slot count is within 1% (relative) of its weighted share.
    fn assert_shares_within_one_percent(weights: &[u32]) {
        let keys = keys(weights.len());
        let table = build_table(&backends(&keys, weights), M);
        let shares = ring_shares(&table, weights.len());
        let total_weight: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut worst = 0.0_f64;
        for (index, (&share, &weight)) in shares.iter().zip(weights).enumerate() {
            let expected = f64::from(M) * f64::from(weight) / total_weight as f64;
            let error = (share as f64 - expected).abs() / expected;
            worst = worst.max(error);
            assert!(
                error <= 0.01,
                "backend {index} (weight {weight}) has {share} slots, expected {expected:.1} \
                 (relative error {error:.4}); all shares: {shares:?}"
            );
        }
        println!(
            "{} backends, weights {:?}..: worst relative share error {worst:.5}",
            weights.len(),
            &weights[..weights.len().min(10)]
        );
    }

    #[test]
    fn equal_weights_give_equal_shares() {
        assert_shares_within_one_percent(&[100; 10]);
        assert_shares_within_one_percent(&[100; 100]);
    }

    #[test]
    fn unequal_weights_give_proportional_shares() {
        let cycling: Vec<u32> = (0..100).map(|i| i % 10 + 1).collect();
        assert_shares_within_one_percent(&cycling[..10]);
        assert_shares_within_one_percent(&cycling);
    }

    /// Removing any one of ten equal backends must leave at least 99% of the other nine's slots
    /// with the same owner (the paper's "minimal disruption", which Maglev only approximates).
    #[test]
    fn removing_one_of_ten_backends_barely_moves_the_others() {
        fn owner_key<'a>(list: &[MaglevBackend<'a>], owner: u32) -> &'a [u8] {
            list[owner as usize].key
        }
        let keys = keys(10);
        let all = backends(&keys, &[100; 10]);
        let before = build_table(&all, M);
        for removed in 0..all.len() {
            let mut nine = all.clone();
            nine.remove(removed);
            let after = build_table(&nine, M);
            // Compare owners by key: the indices of the nine shift down past the removed one.
            let mut slots_of_nine = 0usize;
            let mut moved = 0usize;
            for (&old, &new) in before.iter().zip(&after) {
                if old as usize == removed {
                    continue;
                }
                slots_of_nine += 1;
                if owner_key(&all, old) != owner_key(&nine, new) {
                    moved += 1;
                }
            }
            let ratio = moved as f64 / slots_of_nine as f64;
            println!(
                "removing backend {removed} of 10: {moved} of the other nine's {slots_of_nine} slots moved ({ratio:.5})"
            );
            assert!(
                ratio <= 0.01,
                "removing backend {removed} of 10 moved {moved} of the other nine's \
                 {slots_of_nine} slots ({ratio:.5})"
            );
        }
    }

    #[test]
    fn weight_zero_is_the_same_as_removal() {
        let keys = keys(10);
        let mut weights = [100; 10];
        weights[3] = 0;
        let drained = build_table(&backends(&keys, &weights), M);
        assert!(!drained.contains(&3), "a weight-0 backend owns a slot");
        assert!(!drained.contains(&NO_BACKEND), "a slot was left empty");

        let mut without = backends(&keys, &weights);
        without.remove(3);
        let removed = build_table(&without, M);
        let renumbered: Vec<u32> = removed
            .iter()
            .map(|&owner| if owner >= 3 { owner + 1 } else { owner })
            .collect();
        assert!(
            drained == renumbered,
            "draining and removing give different tables"
        );
    }

    #[test]
    fn all_zero_weights_or_no_backends_give_an_empty_table() {
        let keys = keys(5);
        let table = build_table(&backends(&keys, &[0; 5]), 1021);
        assert_eq!(table.len(), 1021);
        assert!(table.iter().all(|&owner| owner == NO_BACKEND));
        assert!(
            build_table(&[], 1021)
                .iter()
                .all(|&owner| owner == NO_BACKEND)
        );
    }

    #[test]
    fn the_table_is_deterministic_and_full() {
        let keys = keys(37);
        let weights: Vec<u32> = (0..37).map(|i| i * 7 % 13).collect();
        let first = build_table(&backends(&keys, &weights), 16381);
        let second = build_table(&backends(&keys, &weights), 16381);
        assert!(first == second, "two builds of the same input differ");
        assert_eq!(first.len(), 16381);
        assert!(
            first
                .iter()
                .all(|&owner| owner != NO_BACKEND && weights[owner as usize] > 0)
        );
    }

    /// The paper's loop, written as plainly as possible: every round, every backend in order
    /// adds its weight and claims while its credit reaches the largest weight.
    fn reference_table(backends: &[MaglevBackend<'_>], ring_size: u32) -> Vec<u32> {
        let m = u64::from(ring_size);
        let mut table = vec![NO_BACKEND; ring_size as usize];
        let max_weight = u64::from(backends.iter().map(|b| b.weight).max().unwrap_or(0));
        if max_weight == 0 {
            return table;
        }
        let params: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                let (offset, skip) = permutation_parameters(b.key, ring_size);
                (u64::from(offset), u64::from(skip))
            })
            .collect();
        let mut next_j = vec![0u64; backends.len()];
        let mut credit = vec![0u64; backends.len()];
        let mut filled = 0;
        loop {
            for (i, backend) in backends.iter().enumerate() {
                if backend.weight == 0 {
                    continue;
                }
                credit[i] += u64::from(backend.weight);
                while credit[i] >= max_weight {
                    credit[i] -= max_weight;
                    let (offset, skip) = params[i];
                    let slot = loop {
                        let slot = ((offset + next_j[i] * skip) % m) as usize;
                        next_j[i] += 1;
                        if table[slot] == NO_BACKEND {
                            break slot;
                        }
                    };
                    table[slot] = i as u32;
                    filled += 1;
                    if filled == table.len() {
                        return table;
                    }
                }
            }
        }
    }

    #[test]
    fn the_scheduled_build_matches_the_plain_round_loop() {
        let keys = keys(50);
        let cases: [(&[u32], u32); 11] = [
            (&[1, 2, 3], 3),
            (&[5, 1], 2),
            (&[1; 50], 1021),
            (&[7; 10], 16381),
            (&[3, 0, 3, 3, 0], 1021),
            (&[100; 3], 65537),
            (&[5, 0, 3, 9, 9, 1, 0, 2], 1021),
            (&[u32::MAX, 1, 2, u32::MAX / 3, 7], 1021),
            (&[1, 1000, 3], 16381),
            (&[4, 4, 4], 2),
            (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 13),
        ];
        for (weights, ring_size) in cases {
            let list = backends(&keys, weights);
            assert!(
                build_table(&list, ring_size) == reference_table(&list, ring_size),
                "tables differ for weights {weights:?} at M={ring_size}"
            );
        }
    }

    /// The batched claims of equal-weight builds must give exactly the scalar loop's table, for
    /// batches of 8 lanes (8..16 backends) and 16 (more), rings small enough that lanes of one
    /// batch often find the same slot, and backend counts around the batch sizes.
    #[test]
    fn batched_claims_match_the_scalar_loop() {
        let keys = address_keys(2000);
        let counts: Vec<usize> = (1..=40)
            .chain((41..2000).step_by(97))
            .chain([63, 64, 65, 127, 128, 129, 999, 1000, 1999, 2000])
            .collect();
        let mut batched = Vec::new();
        let mut scalar = Vec::new();
        for ring_size in [2, 3, 5, 7, 13, 31, 251, 1021, 4093, 16381, 65537] {
            for &count in &counts {
                let lists: Vec<PreferenceList> = keys[..count]
                    .iter()
                    .map(|key| PreferenceList::of(key, ring_size))
                    .collect();
                let weights = vec![7; count];
                build_table_with(
                    &lists,
                    &weights,
                    ring_size,
                    &mut batched,
                    Lanes::IfAvailable,
                );
                build_table_with(&lists, &weights, ring_size, &mut scalar, Lanes::Never);
                assert!(
                    batched == scalar,
                    "batched and scalar tables differ for {count} backends at M={ring_size}"
                );
                assert!(!batched.contains(&NO_BACKEND), "a slot was left empty");
            }
        }
    }

    /// Rings must not reshuffle when the daemon is rebuilt with another compiler or for another
    /// machine: pin the hash.
    #[test]
    fn the_hash_is_pinned() {
        // FNV-1a 64 reference vectors (seed 0 leaves the standard offset basis).
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV_OFFSET_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            permutation_parameters(b"\x0a\x00\x00\x0bweb", M),
            PINNED_PARAMETERS
        );
    }
    const PINNED_PARAMETERS: (u32, u32) = (33082, 26240);

    /// Weight sets of the golden test: equal ones, and skewed ones with zeros and huge weights.
    fn golden_weight_sets() -> Vec<(&'static str, Vec<u32>)> {
        let mut sets: Vec<(&'static str, Vec<u32>)> = [1, 2, 3, 10, 100, 1000]
            .into_iter()
            .map(|n| ("equal", vec![100; n]))
            .collect();
        sets.push(("cycling 1..10", (0..100).map(|i| i % 10 + 1).collect()));
        sets.push(("cycling 0..12", (0..1000).map(|i| i * 7 % 13).collect()));
        sets.push(("one huge", {
            let mut w = vec![1; 100];
            w[37] = u32::MAX;
            w
        }));
        sets.push(("one heavy", {
            let mut w = vec![100; 1000];
            w[500] = 50_000;
            w
        }));
        sets.push(("extremes", vec![u32::MAX, 1, 2, u32::MAX / 3, 7, 0]));
        sets.push((
            "equal with zeros",
            (0..100).map(|i| if i % 3 == 0 { 0 } else { 5 }).collect(),
        ));
        sets.push(("all zero", vec![0; 10]));
        sets.push(("powers of two", (0..20).map(|i| 1 << i).collect()));
        // A fixed LCG, so the set is the same everywhere: weights 0..=999, about a tenth 0.
        sets.push(("lcg", {
            let mut state: u64 = 0x2545_f491_4f6c_dd1d;
            (0..1000)
                .map(|_| {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let w = (state >> 33) as u32 % 1100;
                    if w >= 1000 { 0 } else { w }
                })
                .collect()
        }));
        sets
    }

    /// A stable digest of a table (FNV-1a over its little-endian entries, then `fmix64`).
    fn raw_table_digest(table: &[u32]) -> u64 {
        let hash = table.iter().fold(FNV_OFFSET_BASIS, |hash, owner| {
            fnv1a64(hash, &owner.to_le_bytes())
        });
        fmix64(hash ^ table.len() as u64)
    }

    /// Every node of a fleet and every restarted daemon must compute the ring older builds did:
    /// pins the tables (not just properties of them) of many inputs. The digests were computed
    /// by the build loop before it was optimised; a change here reshuffles production rings.
    #[test]
    fn the_tables_are_pinned() {
        // The daemon's keys (address strings) and the binary ones of the other tests.
        let address_keys = address_keys(1000);
        let binary_keys = keys(1000);
        let mut got = Vec::new();
        for (key_name, keys) in [("address", &address_keys), ("binary", &binary_keys)] {
            for (set_name, weights) in golden_weight_sets() {
                for ring_size in [7, 251, 65537, 131071] {
                    let table = build_table(&backends(keys, &weights), ring_size);
                    got.push(format!(
                        "{key_name} keys, {set_name} x{}, M={ring_size}: {:#018x}",
                        weights.len(),
                        raw_table_digest(&table)
                    ));
                }
            }
        }
        let expected: Vec<String> = PINNED_TABLES
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        if got != expected {
            for line in &got {
                println!("{line}");
            }
        }
        assert_eq!(got, expected, "a Maglev table changed");
    }

    /// Digests of [`the_tables_are_pinned`], one case a line.
    const PINNED_TABLES: &str = "
    address keys, equal x1, M=7: 0xaec8f9a4ec2d57d8
    address keys, equal x1, M=251: 0xd6edc015130548b2
    address keys, equal x1, M=65537: 0x43b091b32a8c9c01
    address keys, equal x1, M=131071: 0x01eda6b3d8cb2563
    address keys, equal x2, M=7: 0xfe76ec0e280a1844
    address keys, equal x2, M=251: 0xf2d048006cefee2c
    address keys, equal x2, M=65537: 0x76b80658b909b1dc
    address keys, equal x2, M=131071: 0x93bd422a86f86e57
    address keys, equal x3, M=7: 0x980de8aa219da010
    address keys, equal x3, M=251: 0xc450ab35285949be
    address keys, equal x3, M=65537: 0x67fad9815652f40c
    address keys, equal x3, M=131071: 0xee0e13947aa690ab
    address keys, equal x10, M=7: 0x30e876335d9d8eb7
    address keys, equal x10, M=251: 0x93b22b931884c611
    address keys, equal x10, M=65537: 0xaa9c3f3b08344484
    address keys, equal x10, M=131071: 0x75b143f16bffef2f
    address keys, equal x100, M=7: 0x30e876335d9d8eb7
    address keys, equal x100, M=251: 0x7ddb1a5a41a997f2
    address keys, equal x100, M=65537: 0xe1f3e9cca8e35d7b
    address keys, equal x100, M=131071: 0x74f1dd8b6cdf7d77
    address keys, equal x1000, M=7: 0x30e876335d9d8eb7
    address keys, equal x1000, M=251: 0xbca1dd9799773ac1
    address keys, equal x1000, M=65537: 0x54b34f4d8e7a2e16
    address keys, equal x1000, M=131071: 0x40f78b586e29c720
    address keys, cycling 1..10 x100, M=7: 0x6a2a52dc8c173be6
    address keys, cycling 1..10 x100, M=251: 0x07501c21492a60c4
    address keys, cycling 1..10 x100, M=65537: 0x8561c0e13956374c
    address keys, cycling 1..10 x100, M=131071: 0xc215436e16f97d87
    address keys, cycling 0..12 x1000, M=7: 0x4aeb93d88495a6d4
    address keys, cycling 0..12 x1000, M=251: 0xa58925100498aa11
    address keys, cycling 0..12 x1000, M=65537: 0x0547303bcc7f6d98
    address keys, cycling 0..12 x1000, M=131071: 0x794f46c4d9add759
    address keys, one huge x100, M=7: 0x48b921a466d1ecf6
    address keys, one huge x100, M=251: 0xe3f8d867993a7591
    address keys, one huge x100, M=65537: 0xc660eadad4bf493a
    address keys, one huge x100, M=131071: 0x840c5962101613e0
    address keys, one heavy x1000, M=7: 0x19ba5730b551b58f
    address keys, one heavy x1000, M=251: 0x6c8612c6daa64e88
    address keys, one heavy x1000, M=65537: 0xb29592e4ecf2c16d
    address keys, one heavy x1000, M=131071: 0x58ae6d38e03a703d
    address keys, extremes x6, M=7: 0x005d988dcf90aa07
    address keys, extremes x6, M=251: 0xe0388046596aec1f
    address keys, extremes x6, M=65537: 0xe302c80c3da3245a
    address keys, extremes x6, M=131071: 0x0abbb0dad3d8a593
    address keys, equal with zeros x100, M=7: 0x83d519e691639319
    address keys, equal with zeros x100, M=251: 0xb3ef619bd0145702
    address keys, equal with zeros x100, M=65537: 0x03c9b806433dafcb
    address keys, equal with zeros x100, M=131071: 0x0247109cbdce7583
    address keys, all zero x10, M=7: 0x8052ea444db5419a
    address keys, all zero x10, M=251: 0x96e38d7555ebd968
    address keys, all zero x10, M=65537: 0x314bfa402f7cedc1
    address keys, all zero x10, M=131071: 0x155acc22995b81ac
    address keys, powers of two x20, M=7: 0x581a7d5044c38547
    address keys, powers of two x20, M=251: 0xa37fdcd80098e418
    address keys, powers of two x20, M=65537: 0x58d1883f57db1e2c
    address keys, powers of two x20, M=131071: 0x57c9e72b469506d2
    address keys, lcg x1000, M=7: 0x69b31449a920fc7c
    address keys, lcg x1000, M=251: 0x27204c37626f6e88
    address keys, lcg x1000, M=65537: 0x5cd02c99f6b66fe1
    address keys, lcg x1000, M=131071: 0x113e9be979243ed5
    binary keys, equal x1, M=7: 0xaec8f9a4ec2d57d8
    binary keys, equal x1, M=251: 0xd6edc015130548b2
    binary keys, equal x1, M=65537: 0x43b091b32a8c9c01
    binary keys, equal x1, M=131071: 0x01eda6b3d8cb2563
    binary keys, equal x2, M=7: 0xfbd0d0e5f77f4cea
    binary keys, equal x2, M=251: 0x8f1f78b3ced79eb1
    binary keys, equal x2, M=65537: 0x60d5804d401be0c0
    binary keys, equal x2, M=131071: 0x32f4f0a36b3c50d3
    binary keys, equal x3, M=7: 0x8b5f3f49da075928
    binary keys, equal x3, M=251: 0x39e35d4921a1f6ba
    binary keys, equal x3, M=65537: 0x43e058cc7ed12a80
    binary keys, equal x3, M=131071: 0xcd1cc27c04fb49ba
    binary keys, equal x10, M=7: 0xf6beccef3729e8e5
    binary keys, equal x10, M=251: 0x955c6edded8cfabb
    binary keys, equal x10, M=65537: 0x33d9fcd266b47857
    binary keys, equal x10, M=131071: 0x47cfaf4e11bee7a9
    binary keys, equal x100, M=7: 0xf6beccef3729e8e5
    binary keys, equal x100, M=251: 0x03967174fe9110a4
    binary keys, equal x100, M=65537: 0x31606bad18859238
    binary keys, equal x100, M=131071: 0xd575868283a85d41
    binary keys, equal x1000, M=7: 0xf6beccef3729e8e5
    binary keys, equal x1000, M=251: 0xa0320382b922d6c3
    binary keys, equal x1000, M=65537: 0xff74aefeb9a76a64
    binary keys, equal x1000, M=131071: 0x9610d8c2462d07ec
    binary keys, cycling 1..10 x100, M=7: 0x2937204deee43aa7
    binary keys, cycling 1..10 x100, M=251: 0x03fc251127b504bf
    binary keys, cycling 1..10 x100, M=65537: 0x9866f78629618c84
    binary keys, cycling 1..10 x100, M=131071: 0x0c023855b88a9791
    binary keys, cycling 0..12 x1000, M=7: 0x0780e7815a77a51a
    binary keys, cycling 0..12 x1000, M=251: 0x0c3e963f1bdf9417
    binary keys, cycling 0..12 x1000, M=65537: 0xfada8c8e16fc955d
    binary keys, cycling 0..12 x1000, M=131071: 0x071336d67c2270f7
    binary keys, one huge x100, M=7: 0x48b921a466d1ecf6
    binary keys, one huge x100, M=251: 0xe3f8d867993a7591
    binary keys, one huge x100, M=65537: 0xc660eadad4bf493a
    binary keys, one huge x100, M=131071: 0x840c5962101613e0
    binary keys, one heavy x1000, M=7: 0x19ba5730b551b58f
    binary keys, one heavy x1000, M=251: 0x6c8612c6daa64e88
    binary keys, one heavy x1000, M=65537: 0xcca3eae801ffba96
    binary keys, one heavy x1000, M=131071: 0xace08fbe52df954b
    binary keys, extremes x6, M=7: 0x005d988dcf90aa07
    binary keys, extremes x6, M=251: 0xa17525dc7892bd00
    binary keys, extremes x6, M=65537: 0x406671ada96252d0
    binary keys, extremes x6, M=131071: 0x8d14d59776e0621c
    binary keys, equal with zeros x100, M=7: 0x85c7f878de916485
    binary keys, equal with zeros x100, M=251: 0xef1147a2d18c720c
    binary keys, equal with zeros x100, M=65537: 0xbc45f847d27b749c
    binary keys, equal with zeros x100, M=131071: 0x55130d91df4ba84b
    binary keys, all zero x10, M=7: 0x8052ea444db5419a
    binary keys, all zero x10, M=251: 0x96e38d7555ebd968
    binary keys, all zero x10, M=65537: 0x314bfa402f7cedc1
    binary keys, all zero x10, M=131071: 0x155acc22995b81ac
    binary keys, powers of two x20, M=7: 0x98e7300f874a9639
    binary keys, powers of two x20, M=251: 0x54e01143415670d3
    binary keys, powers of two x20, M=65537: 0x7efbd470532f60a6
    binary keys, powers of two x20, M=131071: 0x88ad9a6760bcbcb2
    binary keys, lcg x1000, M=7: 0x61953e441c16d834
    binary keys, lcg x1000, M=251: 0xff2bf7f8be5f42bc
    binary keys, lcg x1000, M=65537: 0xd74f4dbd0bf8a736
    binary keys, lcg x1000, M=131071: 0xe25f676248b9dc05
";

    #[test]
    fn modulus_and_inverse_agree_with_division() {
        for m in [2_u32, 3, 7, 65537, 1_000_003, 4_294_967_291] {
            let modulus = Modulus::new(m);
            let m64 = u64::from(m);
            let largest = m64 * (m64 + 1) - 1;
            for value in [0, 1, m64 - 1, m64, largest / 3, largest - m64, largest] {
                assert_eq!(modulus.reduce(value), value % m64, "{value} mod {m}");
            }
            for value in [1, 2, m - 1, m / 2 + 1].into_iter().filter(|&v| v < m) {
                let inverse = inverse_modulo(value, m);
                assert_eq!(u64::from(value) * u64::from(inverse) % m64, 1 % m64);
            }
        }
    }

    #[test]
    fn is_prime_knows_primes() {
        for prime in [
            2,
            3,
            5,
            7,
            13,
            1021,
            16381,
            65521,
            65537,
            1_000_003,
            4_294_967_291,
        ] {
            assert!(is_prime(prime), "{prime} is prime");
        }
        for composite in [0, 1, 4, 9, 25, 1024, 65535, 65536, 1_000_001, 4_294_967_295] {
            assert!(!is_prime(composite), "{composite} is not prime");
        }
    }

    #[test]
    #[should_panic(expected = "not prime")]
    fn a_composite_ring_size_panics() {
        build_table(&[], 65536);
    }

    #[test]
    fn ring_shares_counts_owners_and_skips_empty_slots() {
        assert_eq!(
            ring_shares(&[0, 2, 2, NO_BACKEND, 0, 2], 4),
            vec![2, 0, 3, 0]
        );
    }
}
