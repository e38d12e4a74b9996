//! lb's routes against a real kernel, in a namespace of their own: added, listed, and withdrawn,
//! and nobody else's route touched.

use crate::testing::netns::{End, NsPair};

use super::{LbRoute, routes, withdraw_routes_via};
use crate::net::NetlinkHandle;

const TABLE: u32 = 200;

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn lbs_routes_are_added_listed_and_withdrawn_and_no_other_route_is_touched() {
    let pair = NsPair::new(
        "lbann",
        [
            End::new("lb", "lba0", "10.78.0.1/24").ipv6("fd00:78::1/64"),
            End::new("peer", "lba1", "10.78.0.2/24").ipv6("fd00:78::2/64"),
        ],
    );
    let [lb, _] = pair.names();
    // Somebody else's routes in the same table: another protocol, and lb's protocol on a
    // prefix lb never makes.
    pair.ip(
        &lb,
        &[
            "route",
            "add",
            "192.0.2.1/32",
            "dev",
            "lba0",
            "table",
            "200",
            "proto",
            "static",
        ],
    );
    pair.ip(
        &lb,
        &[
            "route",
            "add",
            "192.0.2.0/24",
            "dev",
            "lba0",
            "table",
            "200",
            "proto",
            "76",
        ],
    );
    pair.ip(
        &lb,
        &[
            "-6",
            "route",
            "add",
            "2001:db8::1/128",
            "dev",
            "lba0",
            "table",
            "200",
        ],
    );
    let foreign = |pair: &NsPair| {
        let v4 = pair.ip(&lb, &["route", "show", "table", "200"]);
        let v6 = pair.ip(&lb, &["-6", "route", "show", "table", "200"]);
        (v4, v6)
    };

    let shown = crate::testing::netns::run_in(&lb, || async {
        let net = NetlinkHandle::new().unwrap();
        let ifindex = net.interface_by_name("lba0").await.unwrap().index;
        let v4 = LbRoute {
            address: "10.78.0.100".parse().unwrap(),
            table: TABLE,
            ifindex,
        };
        let v6 = LbRoute {
            address: "fd00:78::100".parse().unwrap(),
            table: TABLE,
            ifindex,
        };
        routes::add(&net, v4).await.unwrap();
        routes::add(&net, v6).await.unwrap();
        // Adding twice replaces, it does not fail.
        routes::add(&net, v4).await.unwrap();
        assert_eq!(
            routes::list(&net, Some(TABLE), Some(ifindex))
                .await
                .unwrap(),
            [v4, v6]
        );
        assert_eq!(routes::list(&net, Some(201), None).await.unwrap(), []);
        assert_eq!(
            routes::list(&net, None, Some(ifindex + 1000))
                .await
                .unwrap(),
            []
        );
        ifindex
    });
    let (v4, v6) = foreign(&pair);
    assert!(
        v4.lines()
            .any(|l| l.trim() == "10.78.0.100 dev lba0 proto 76 scope link"),
        "lb's IPv4 route as ip shows it:\n{v4}"
    );
    assert!(
        v6.lines()
            .any(|l| l.starts_with("fd00:78::100 dev lba0 proto 76 ")),
        "lb's IPv6 route as ip shows it:\n{v6}"
    );

    let withdrawn = crate::testing::netns::run_in(&lb, move || async move {
        let net = NetlinkHandle::new().unwrap();
        let withdrawn = withdraw_routes_via(&net, shown).await.unwrap();
        // Deleting a route that is gone is no error.
        routes::delete(&net, withdrawn[0]).await.unwrap();
        assert_eq!(routes::list(&net, None, Some(shown)).await.unwrap(), []);
        withdrawn
    });
    let addresses: Vec<String> = withdrawn.iter().map(|r| r.address.to_string()).collect();
    assert_eq!(addresses, ["10.78.0.100", "fd00:78::100"]);
    let (v4, v6) = foreign(&pair);
    assert_eq!(
        v4.lines().map(str::trim).collect::<Vec<_>>(),
        [
            "192.0.2.0/24 dev lba0 proto 76 scope link",
            "192.0.2.1 dev lba0 proto static scope link"
        ],
        "only lb's host routes went"
    );
    assert!(v6.contains("2001:db8::1 dev lba0"), "{v6}");
}
