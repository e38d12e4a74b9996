//! Which of a VIP's pools serves new flows: the primaries while at least `min_healthy` of them are
//! up, else the healthy standbys (the "flip"), and back once enough primaries have risen again.
//!
//! Below `min_healthy` with no healthy standby, the remaining healthy primaries keep serving
//! (degraded beats dark); with nothing healthy at all the VIP's `on_all_down` policy applies.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivePool {
    Primary,
    Standby,
    /// Nothing healthy: `on_all_down` decides (drop, or pass to the host).
    None,
}

impl ActivePool {
    pub const fn as_str(self) -> &'static str {
        match self {
            ActivePool::Primary => "primary",
            ActivePool::Standby => "standby",
            ActivePool::None => "none",
        }
    }
}

impl fmt::Display for ActivePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the pool decision needs to know about one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub standby: bool,
    /// Healthy and reachable.
    pub usable: bool,
}

/// The pool that serves new flows.
pub fn select(members: &[Member], min_healthy: u32) -> ActivePool {
    let healthy_primaries = members.iter().filter(|m| !m.standby && m.usable).count();
    let healthy_standbys = members.iter().filter(|m| m.standby && m.usable).count();
    if healthy_primaries >= min_healthy as usize && healthy_primaries > 0 {
        ActivePool::Primary
    } else if healthy_standbys > 0 {
        ActivePool::Standby
    } else if healthy_primaries > 0 {
        ActivePool::Primary
    } else {
        ActivePool::None
    }
}

/// Whether a member belongs to the active pool.
pub fn in_pool(member: Member, pool: ActivePool) -> bool {
    match pool {
        ActivePool::Primary => !member.standby,
        ActivePool::Standby => member.standby,
        ActivePool::None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(
        primaries_up: usize,
        primaries_down: usize,
        standbys_up: usize,
        standbys_down: usize,
    ) -> Vec<Member> {
        let mut m = Vec::new();
        m.extend((0..primaries_up).map(|_| Member {
            standby: false,
            usable: true,
        }));
        m.extend((0..primaries_down).map(|_| Member {
            standby: false,
            usable: false,
        }));
        m.extend((0..standbys_up).map(|_| Member {
            standby: true,
            usable: true,
        }));
        m.extend((0..standbys_down).map(|_| Member {
            standby: true,
            usable: false,
        }));
        m
    }

    #[test]
    fn primaries_serve_while_at_least_min_healthy_are_up() {
        assert_eq!(select(&members(3, 0, 1, 0), 1), ActivePool::Primary);
        assert_eq!(select(&members(1, 2, 1, 0), 1), ActivePool::Primary);
        assert_eq!(select(&members(2, 1, 1, 0), 2), ActivePool::Primary);
    }

    #[test]
    fn below_min_healthy_the_standbys_take_over() {
        assert_eq!(select(&members(0, 3, 1, 0), 1), ActivePool::Standby);
        assert_eq!(select(&members(1, 2, 1, 0), 2), ActivePool::Standby);
    }

    #[test]
    fn without_a_healthy_standby_the_remaining_primaries_keep_serving() {
        assert_eq!(select(&members(1, 2, 0, 1), 2), ActivePool::Primary);
        assert_eq!(select(&members(1, 2, 0, 0), 2), ActivePool::Primary);
    }

    #[test]
    fn nothing_healthy_means_no_pool() {
        assert_eq!(select(&members(0, 3, 0, 1), 1), ActivePool::None);
        assert_eq!(select(&[], 1), ActivePool::None);
    }

    #[test]
    fn membership_follows_the_pool() {
        let primary = Member {
            standby: false,
            usable: true,
        };
        let standby = Member {
            standby: true,
            usable: true,
        };
        assert!(in_pool(primary, ActivePool::Primary) && !in_pool(standby, ActivePool::Primary));
        assert!(in_pool(standby, ActivePool::Standby) && !in_pool(primary, ActivePool::Standby));
        assert!(!in_pool(primary, ActivePool::None));
    }
}
