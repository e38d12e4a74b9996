//! Tests against a real kernel: two network namespaces joined by a veth pair, built per test and
//! deleted by a drop guard even when the test panics (see [`crate::testing::netns`]).
//!
//! ```text
//!   lbnet-<pid>-<n>-lb                  lbnet-<pid>-<n>-be
//!   lbn0 02:77:00:00:00:01  ──veth──  lbn1 02:77:00:00:00:02
//!   10.77.0.1/24 fd00:77::1/64          10.77.0.2/24 fd00:77::2/64
//! ```
//!
//! Resolution runs inside the LB namespace on a thread that `setns`es into it: a netlink socket
//! belongs to the namespace of the thread that creates it.

use std::future::Future;
use std::net::IpAddr;
use std::ops::Deref;
use std::time::{Duration, Instant};

use super::{NetError, NetlinkHandle, format_mac, resolve_backend};
use crate::testing::netns::{self, End, run};

const LB_IF: &str = "lbn0";
const BACKEND_IF: &str = "lbn1";
const LB_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const BACKEND_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const BACKEND_V4: &str = "10.77.0.2";
const BACKEND_V6: &str = "fd00:77::2";

/// The shared namespace pair with this module's addresses; `lb` names the LB end's namespace.
struct NsPair {
    lb: String,
    net: netns::NsPair,
}

impl NsPair {
    fn new() -> Self {
        let net = netns::NsPair::new(
            "lbnet",
            [
                End::new("lb", LB_IF, "10.77.0.1/24")
                    .mac(LB_MAC)
                    .ipv6("fd00:77::1/64"),
                End::new("be", BACKEND_IF, "10.77.0.2/24")
                    .mac(BACKEND_MAC)
                    .ipv6("fd00:77::2/64"),
            ],
        );
        let [lb, _] = net.names();
        Self { lb, net }
    }

    /// Runs `body` inside the LB namespace (see [`netns::run_in`]) and returns its result.
    fn in_lb<F, Fut, T>(&self, body: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        netns::run_in(&self.lb, body)
    }
}

impl Deref for NsPair {
    type Target = netns::NsPair;

    fn deref(&self) -> &netns::NsPair {
        &self.net
    }
}

/// Builds a pair, runs `test` with it, then checks the guard left no namespace behind.
fn with_pair(test: impl FnOnce(&NsPair)) {
    let pair = NsPair::new();
    let names = pair.names();
    test(&pair);
    drop(pair);
    let left = run("ip", &["netns", "list"]);
    for name in names {
        assert!(
            !left
                .lines()
                .any(|line| line.split_whitespace().next() == Some(name.as_str())),
            "namespace {name} left behind: {left}"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn finds_interfaces_by_name_and_index_with_their_mac_and_kind() {
    with_pair(|pair| {
        pair.in_lb(|| async {
            let net = NetlinkHandle::new().unwrap();
            let by_name = net.interface_by_name(LB_IF).await.unwrap();
            assert_eq!(by_name.name, LB_IF);
            assert_eq!(by_name.mac, LB_MAC, "got {}", format_mac(&by_name.mac));
            assert_eq!(by_name.kind.as_deref(), Some("veth"));
            assert_eq!(
                net.interface_by_index(by_name.index).await.unwrap(),
                by_name
            );
            // The peer lives in the other namespace: invisible from here.
            assert!(matches!(
                net.interface_by_name(BACKEND_IF).await,
                Err(NetError::NoSuchInterface { .. })
            ));
            // The free function opens its own connection, in this thread's namespace too.
            assert_eq!(super::interface_by_name(LB_IF).await.unwrap(), by_name);
        });
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn resolves_ipv4_and_ipv6_backends_from_an_empty_neighbour_table() {
    with_pair(|pair| {
        let before = pair.ip(&pair.lb, &["neigh", "show"]);
        assert_eq!(before.trim(), "", "neighbour table not empty at the start");
        pair.in_lb(|| async {
            let net = NetlinkHandle::new().unwrap();
            let egress = net.interface_by_name(LB_IF).await.unwrap();
            for backend in [BACKEND_V4, BACKEND_V6] {
                let address: IpAddr = backend.parse().unwrap();
                let started = Instant::now();
                let path = net
                    .resolve_backend(address, Duration::from_secs(5))
                    .await
                    .unwrap();
                eprintln!("resolved {backend} in {:?}", started.elapsed());
                assert_eq!(path.address, address);
                assert_eq!(path.mac, BACKEND_MAC, "got {}", format_mac(&path.mac));
                assert_eq!(path.egress, egress);
                // Resolved now: the second call answers from the table.
                let again = resolve_backend(address, Duration::ZERO).await.unwrap();
                assert_eq!(again, path);
            }
        });
        let after = pair.ip(&pair.lb, &["neigh", "show"]);
        for backend in [BACKEND_V4, BACKEND_V6] {
            assert!(
                after.contains(backend),
                "{backend} not in the table: {after}"
            );
        }
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_address_nobody_holds_is_unresolved_within_the_timeout() {
    with_pair(|pair| {
        pair.in_lb(|| async {
            let net = NetlinkHandle::new().unwrap();
            for missing in ["10.77.0.99", "fd00:77::99"] {
                let address: IpAddr = missing.parse().unwrap();
                let started = Instant::now();
                let error = net
                    .resolve_backend(address, Duration::from_secs(1))
                    .await
                    .unwrap_err();
                let elapsed = started.elapsed();
                let message = error.to_string();
                match error {
                    NetError::Unresolved {
                        address: a,
                        interface,
                        waited,
                        state,
                        ..
                    } => {
                        assert_eq!(a, address);
                        assert_eq!(interface, LB_IF);
                        assert!(waited >= Duration::from_secs(1), "{waited:?}");
                        assert_eq!(state, "INCOMPLETE", "{message}");
                    }
                    other => panic!("expected Unresolved for {missing}, got {other:?}"),
                }
                assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");
                assert!(
                    message.contains(missing) && message.contains(LB_IF),
                    "{message}"
                );
            }
        });
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_backend_behind_a_gateway_is_not_on_link() {
    with_pair(|pair| {
        pair.ip(
            &pair.lb,
            &["route", "add", "10.99.0.0/24", "via", BACKEND_V4],
        );
        pair.ip(
            &pair.lb,
            &["-6", "route", "add", "fd00:99::/64", "via", BACKEND_V6],
        );
        pair.in_lb(|| async {
            let net = NetlinkHandle::new().unwrap();
            for (backend, gw) in [("10.99.0.5", BACKEND_V4), ("fd00:99::5", BACKEND_V6)] {
                let address: IpAddr = backend.parse().unwrap();
                match net.resolve_backend(address, Duration::from_secs(1)).await {
                    Err(NetError::NotOnLink {
                        address: a,
                        gateway,
                        interface,
                    }) => {
                        assert_eq!(a, address);
                        assert_eq!(gateway, gw.parse::<IpAddr>().unwrap());
                        assert_eq!(interface, LB_IF);
                    }
                    other => panic!("expected NotOnLink for {backend}, got {other:?}"),
                }
            }
        });
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn local_and_unrouted_addresses_are_refused() {
    with_pair(|pair| {
        pair.in_lb(|| async {
            let net = NetlinkHandle::new().unwrap();
            for local in ["10.77.0.1", "fd00:77::1"] {
                let result = net
                    .resolve_backend(local.parse().unwrap(), Duration::from_secs(1))
                    .await;
                assert!(
                    matches!(result, Err(NetError::LocalAddress { .. })),
                    "{local}: {result:?}"
                );
            }
            // No default route in the namespace.
            for far in ["192.0.2.1", "2001:db8::1"] {
                let result = net
                    .resolve_backend(far.parse().unwrap(), Duration::from_secs(1))
                    .await;
                match result {
                    Err(error @ NetError::NoRoute { .. }) => {
                        assert!(error.to_string().contains(far), "{error}");
                    }
                    other => panic!("expected NoRoute for {far}, got {other:?}"),
                }
            }
        });
    });
}

/// The unprivileged fallback alone: the datagram must start ARP and ND like NTF_USE does.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_discard_datagram_also_starts_resolution() {
    with_pair(|pair| {
        pair.in_lb(|| async {
            for backend in [BACKEND_V4, BACKEND_V6] {
                let address: IpAddr = backend.parse().unwrap();
                super::neighbour::send_discard_datagram(address).unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let table = pair.ip(&pair.lb, &["neigh", "show"]);
            let mac = format_mac(&BACKEND_MAC);
            let resolved = |backend: &str| {
                table
                    .lines()
                    .any(|l| l.starts_with(&format!("{backend} ")) && l.contains(&mac))
            };
            if resolved(BACKEND_V4) && resolved(BACKEND_V6) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not resolved by the datagram: {table}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    });
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_panicking_test_still_removes_its_namespaces() {
    let mut names = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let pair = NsPair::new();
        names = Some(pair.names());
        pair.in_lb(|| async { panic!("deliberate panic inside the namespace") });
    }));
    assert!(outcome.is_err(), "the body should have panicked");
    let left = run("ip", &["netns", "list"]);
    for name in names.expect("the pair was built") {
        assert!(
            !left.contains(&name),
            "namespace {name} left behind: {left}"
        );
    }
}
