//! The `[dns]` responder with the real daemon in a namespace, queried from other namespaces
//! with `dig`: answers hold exactly the up addresses and rotate; a VIP that loses its backends
//! and a tcp-checked plain address leave the answer within the detection bound and come back;
//! `on_all_down` both ways; NXDOMAIN, REFUSED, NODATA, SOA and NS; truncation over UDP and the
//! whole answer over TCP; a 1,000-query burst from several clients; malformed queries; reloads.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use lb_tests::{
    TcpIdentityServer,
    daemon::{Launch, LbDaemon, api_socket_for, lb_reload, lb_status},
    dns_lab::{DNS_HEALTH, DnsLab, ZONE, dig_in},
    topology::leftovers,
};

/// The detection bound of [`lb_tests::dns_lab::HEALTH`] (fall 2 x interval 100 ms, plus the
/// 100 ms timeout: 300 ms) with slack for two shared cores and dig's own start-up, like the
/// announce test's; measured times (160-230 ms here) are printed.
const BOUND: Duration = Duration::from_millis(1000);

fn names(lab: &DnsLab) -> String {
    let big: Vec<String> = (1..=60).map(|i| format!("\"198.18.0.{i}\"")).collect();
    format!(
        "[[dns.name]]\nname = \"www\"\naddresses = [\"{vip}\", \"{b1}\"]\nhealth = {DNS_HEALTH}\n\
         [[dns.name]]\nname = \"static\"\naddresses = [\"192.0.2.7\", \"192.0.2.8\", \"2001:db8::7\"]\n\
         [[dns.name]]\nname = \"gone-all\"\naddresses = [\"{b0}\", \"{b1}\"]\non_all_down = \"all\"\nhealth = {closed}\n\
         [[dns.name]]\nname = \"gone-none\"\naddresses = [\"{b0}\"]\non_all_down = \"none\"\nhealth = {closed}\n\
         [[dns.name]]\nname = \"big\"\naddresses = [{big}]\n",
        vip = lab.vip(),
        b0 = lab.backend(0),
        b1 = lab.backend(1),
        // Nothing listens on port 81: these checks always fail.
        closed = DNS_HEALTH.replace("port = 80", "port = 81"),
        big = big.join(", "),
    )
}

fn start(lab: &DnsLab) -> LbDaemon {
    let listen = [format!("{}:53", lab.server())];
    let config = lab.config(&listen, &names(lab));
    LbDaemon::start(lab.lab.topo.lb(), &config, Launch::Nsenter).expect("lb starts")
}

fn set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn www(_lab: &DnsLab) -> String {
    format!("www.{ZONE}")
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn answers_hold_exactly_the_up_addresses_rotate_and_carry_exact_rcodes() {
    let prefix = "lbdnsa";
    {
        let lab = DnsLab::new(prefix);
        let daemon = start(&lab);
        let (vip, b0, b1) = (lab.vip(), lab.backend(0), lab.backend(1));
        lab.wait_for_answer(&www(&lab), &[vip.clone(), b1.clone()], BOUND)
            .expect("www answers the VIP and backend 1");

        // Round robin: the first record moves on with every answer; the set stays exact.
        let mut firsts = Vec::new();
        for _ in 0..4 {
            let answer = lab.dig(53, &www(&lab), "A", &[]).expect("dig www");
            assert_eq!(answer.status, "NOERROR");
            assert!(answer.flags.contains(&"aa".to_owned()), "{answer:?}");
            assert_eq!(
                answer.answers.iter().cloned().collect::<BTreeSet<_>>(),
                set(&[&vip, &b1])
            );
            firsts.push(answer.answers[0].clone());
        }
        assert_ne!(firsts[0], firsts[1], "rotated: {firsts:?}");
        assert_eq!(firsts[0], firsts[2], "rotated: {firsts:?}");
        assert_eq!(firsts[1], firsts[3], "rotated: {firsts:?}");

        // Unchecked addresses are always up; AAAA answers the IPv6 ones only.
        let a = lab.dig(53, &format!("static.{ZONE}"), "A", &[]).unwrap();
        assert_eq!(
            a.answers.into_iter().collect::<BTreeSet<_>>(),
            set(&["192.0.2.7", "192.0.2.8"])
        );
        let aaaa = lab.dig(53, &format!("static.{ZONE}"), "AAAA", &[]).unwrap();
        assert_eq!(aaaa.answers, ["2001:db8::7"]);

        // on_all_down: every address, or none.
        let all = lab.dig(53, &format!("gone-all.{ZONE}"), "A", &[]).unwrap();
        assert_eq!(all.status, "NOERROR");
        assert_eq!(
            all.answers.into_iter().collect::<BTreeSet<_>>(),
            set(&[&b0, &b1])
        );
        let none = lab.dig(53, &format!("gone-none.{ZONE}"), "A", &[]).unwrap();
        assert_eq!(none.status, "NOERROR");
        assert!(none.answers.is_empty(), "{none:?}");

        // NXDOMAIN in the zone, REFUSED outside it, NODATA for another type of a known name.
        let nx = lab.dig(53, &format!("nope.{ZONE}"), "A", &[]).unwrap();
        assert_eq!(nx.status, "NXDOMAIN");
        assert_eq!(nx.authority, ["SOA"]);
        let refused = lab.dig(53, "www.example.org.", "A", &[]).unwrap();
        assert_eq!(refused.status, "REFUSED");
        assert!(refused.answers.is_empty());
        let nodata = lab.dig(53, &www(&lab), "MX", &[]).unwrap();
        assert_eq!(nodata.status, "NOERROR");
        assert!(nodata.answers.is_empty());
        assert_eq!(nodata.authority, ["SOA"]);

        // The apex: SOA and NS.
        let soa = lab
            .dig(53, ZONE, "SOA", &["+noall", "+answer", "+comments"])
            .unwrap();
        assert_eq!(soa.status, "NOERROR");
        assert_eq!(soa.answers.len(), 1);
        let ns = lab.dig(53, ZONE, "NS", &[]).unwrap();
        assert_eq!(ns.answers, [format!("ns.{ZONE}")]);

        // 60 addresses do not fit 512 bytes: TC over UDP, the whole answer over TCP (dig's
        // own retry, and +tcp).
        let big = format!("big.{ZONE}");
        let truncated = lab.dig(53, &big, "A", &["+noedns", "+ignore"]).unwrap();
        assert!(truncated.flags.contains(&"tc".to_owned()), "{truncated:?}");
        assert!(truncated.answers.is_empty());
        let retried = lab.dig(53, &big, "A", &["+noedns"]).unwrap();
        assert_eq!(retried.answers.len(), 60, "{retried:?}");
        let tcp = lab.dig(53, &big, "A", &["+tcp"]).unwrap();
        assert_eq!(tcp.answers.len(), 60);

        // Status and metrics-facing counts.
        let report = lb_status(&api_socket_for(lab.lab.topo.lb())).expect("status");
        let dns = &report["dns"];
        assert_eq!(dns["zone"], ZONE);
        assert_eq!(dns["names"][0]["name"], www(&lab));
        let answer: BTreeSet<String> = dns["names"][0]["answer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(answer, set(&[&vip, &b1]));
        let count = |qtype: &str, rcode: &str| {
            dns["queries"]
                .as_array()
                .unwrap()
                .iter()
                .find(|q| q["qtype"] == qtype && q["rcode"] == rcode)
                .map_or(0, |q| q["count"].as_u64().unwrap())
        };
        assert_eq!(count("A", "NXDOMAIN"), 1);
        assert_eq!(count("A", "REFUSED"), 1);
        assert_eq!(count("other", "NOERROR"), 1, "the MX query");
        assert!(dns["truncated"].as_u64().unwrap() >= 2);
        drop(daemon);
    }
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_vip_without_backends_and_a_failed_plain_address_leave_the_answer_and_come_back() {
    let prefix = "lbdnsb";
    {
        let mut lab = DnsLab::new(prefix);
        let daemon = start(&lab);
        let (vip, b0, b1) = (lab.vip(), lab.backend(0), lab.backend(1));
        let name = www(&lab);
        lab.wait_for_answer(&name, &[vip.clone(), b1.clone()], BOUND)
            .expect("both up");
        let mut servers: Vec<Option<TcpIdentityServer>> =
            lab.lab.servers.drain(..).map(Some).collect();
        let restart = |lab: &DnsLab, i: usize| {
            TcpIdentityServer::start(
                lab.lab.topo.backend(i),
                "0.0.0.0:80".parse().unwrap(),
                lab.backend(i),
            )
            .expect("server restarts")
        };

        // The VIP's only backend dies: the VIP cannot serve, its address leaves the answer.
        servers[0] = None;
        let took = lab
            .wait_for_answer(&name, std::slice::from_ref(&b1), BOUND)
            .unwrap();
        println!("dns: VIP left the answer {took:?} after its backend died");
        servers[0] = Some(restart(&lab, 0));
        let took = lab
            .wait_for_answer(&name, &[vip.clone(), b1.clone()], BOUND)
            .unwrap();
        println!("dns: VIP came back {took:?} after its backend restarted");

        // The plain address checked by tcp fails: it leaves, and comes back.
        servers[1] = None;
        let took = lab
            .wait_for_answer(&name, std::slice::from_ref(&vip), BOUND)
            .unwrap();
        println!("dns: {b1} left the answer {took:?} after its server died");
        servers[1] = Some(restart(&lab, 1));
        let took = lab
            .wait_for_answer(&name, &[vip.clone(), b1.clone()], BOUND)
            .unwrap();
        println!("dns: {b1} came back {took:?}");

        // Both down: on_all_down = "all" (the default) answers both.
        servers[0] = None;
        servers[1] = None;
        std::thread::sleep(BOUND);
        lab.wait_for_answer(&name, &[vip.clone(), b1.clone()], BOUND)
            .unwrap();
        let report = lb_status(&api_socket_for(lab.lab.topo.lb())).unwrap();
        let addresses = &report["dns"]["names"][0]["addresses"];
        assert_eq!(addresses[0]["up"], false, "{report}");
        assert_eq!(addresses[1]["up"], false, "{report}");
        let _ = b0;
        drop(daemon);
    }
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_burst_of_1000_queries_from_several_clients_is_answered_without_loss() {
    let prefix = "lbdnsc";
    {
        let lab = DnsLab::new(prefix);
        let daemon = start(&lab);
        let name = www(&lab);
        lab.wait_for_answer(&name, &[lab.vip(), lab.backend(1)], BOUND)
            .unwrap();
        let batch = std::env::temp_dir().join(format!("{prefix}-batch"));
        std::fs::write(&batch, format!("{name} A\n").repeat(250)).unwrap();
        // Four clients at once, in three namespaces; each dig sends its 250 queries one after
        // the other with a single try, so any lost one shows as a timeout.
        let clients = [
            lab.lab.topo.client().name().to_owned(),
            lab.lab.topo.client().name().to_owned(),
            lab.lab.topo.backend(0).name().to_owned(),
            lab.lab.topo.backend(1).name().to_owned(),
        ];
        let server = lab.server();
        let started = std::time::Instant::now();
        let handles: Vec<_> = clients
            .iter()
            .map(|ns| {
                std::process::Command::new("ip")
                    .args(["netns", "exec", ns, "dig"])
                    .arg(format!("@{server}"))
                    .args(["+tries=1", "+time=2", "+noall", "+comments", "-f"])
                    .arg(&batch)
                    .stdout(std::process::Stdio::piped())
                    .spawn()
                    .expect("dig -f")
            })
            .collect();
        let mut answered = 0;
        for handle in handles {
            let output = handle.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&output.stdout);
            answered += text.matches("status: NOERROR").count();
        }
        let took = started.elapsed();
        println!("dns: {answered} of 1000 queries answered in {took:?}");
        assert_eq!(answered, 1000);
        let report = lb_status(&api_socket_for(lab.lab.topo.lb())).unwrap();
        let a_noerror: u64 = report["dns"]["queries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|q| q["qtype"] == "A" && q["rcode"] == "NOERROR")
            .map(|q| q["count"].as_u64().unwrap())
            .sum();
        assert!(a_noerror >= 1000, "{report}");
        let _ = std::fs::remove_file(&batch);

        // A real burst: four sockets in three namespaces each send 250 queries back to back
        // without waiting, then collect the replies; every id must come back.
        let target = SocketAddr::new(server, 53);
        let namespaces = [
            lab.lab.topo.client(),
            lab.lab.topo.client(),
            lab.lab.topo.backend(0),
            lab.lab.topo.backend(1),
        ];
        let started = std::time::Instant::now();
        let answered: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = namespaces
                .iter()
                .map(|ns| scope.spawn(move || ns.run(move || burst(target, 250))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        println!(
            "dns: burst: {answered} of 1000 answered in {:?}",
            started.elapsed()
        );
        assert_eq!(answered, 1000);
        drop(daemon);
    }
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}

/// Sends `count` A queries for www.svc.example. from one socket without waiting, then counts
/// the distinct ids answered with NOERROR and two records.
fn burst(target: SocketAddr, count: u16) -> usize {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    for id in 0..count {
        // The test's own query bytes (header, QNAME, QTYPE A, QCLASS IN): what is tested is
        // the responder's side.
        let mut query = id.to_be_bytes().to_vec();
        query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in ["www", "svc", "example"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        socket.send_to(&query, target).unwrap();
    }
    let mut seen = BTreeSet::new();
    let mut buffer = [0u8; 512];
    while seen.len() < usize::from(count) {
        let Ok(length) = socket.recv(&mut buffer) else {
            break;
        };
        let rcode = buffer[3] & 0x0f;
        let answers = u16::from_be_bytes([buffer[6], buffer[7]]);
        if length >= 12 && rcode == 0 && answers == 2 {
            seen.insert(u16::from_be_bytes([buffer[0], buffer[1]]));
        }
    }
    seen.len()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn malformed_queries_never_crash_the_responder() {
    let prefix = "lbdnsd";
    {
        let lab = DnsLab::new(prefix);
        let mut daemon = start(&lab);
        let name = www(&lab);
        lab.wait_for_answer(&name, &[lab.vip(), lab.backend(1)], BOUND)
            .unwrap();
        let server = SocketAddr::new(lab.server(), 53);
        let formerr = lab.client().run(move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut state = 0x2545_f491_u32;
            let mut random = move || {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            };
            // Random datagrams of every length up to 600 bytes.
            for length in 0..600 {
                let bytes: Vec<u8> = (0..length).map(|_| random()).collect();
                let _ = socket.send_to(&bytes, server);
            }
            // Truncated headers.
            for length in 0..12 {
                let _ = socket.send_to(&[0xab; 12][..length], server);
            }
            // A question of 127 one-character labels (over 255 bytes) and one of 65535
            // questions that are not there, and a pointer loop.
            let mut huge = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for _ in 0..200 {
                huge.extend_from_slice(&[1, b'a']);
            }
            huge.extend_from_slice(&[0, 0, 1, 0, 1]);
            let _ = socket.send_to(&huge, server);
            let many = [0x56, 0x78, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0];
            let _ = socket.send_to(&many, server);
            let looped = [
                0x9a, 0xbc, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1,
            ];
            let _ = socket.send_to(&looped, server);
            // Drain the replies; the FORMERR ones answer the three crafted queries.
            let mut buffer = [0u8; 1024];
            let mut formerr = 0;
            while let Ok(length) = socket.recv(&mut buffer) {
                if length >= 4 && buffer[3] & 0x0f == 1 {
                    formerr += 1;
                }
            }
            // TCP: a length prefix promising more than is sent, then garbage, then a close.
            if let Ok(mut stream) = TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                let _ = stream.write_all(&[0xff, 0xff, 1, 2, 3]);
            }
            if let Ok(mut stream) = TcpStream::connect_timeout(&server, Duration::from_secs(1)) {
                let _ = stream.write_all(&[0, 12, 0xab, 0xab, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
                let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
                let mut reply = [0u8; 64];
                let _ = stream.read(&mut reply);
            }
            formerr
        });
        println!("dns: {formerr} FORMERR replies to the malformed queries");
        assert!(formerr >= 3, "the three crafted queries get FORMERR");
        // Still answering, over UDP and TCP, and the daemon is alive.
        lab.wait_for_answer(&name, &[lab.vip(), lab.backend(1)], BOUND)
            .expect("still answering after the junk");
        let tcp = lab.dig(53, &name, "A", &["+tcp"]).unwrap();
        assert_eq!(tcp.answers.len(), 2);
        assert!(daemon.pid().is_some());
        assert!(
            !daemon.log().contains("panicked"),
            "the daemon panicked:\n{}",
            daemon.log()
        );
        let _ = daemon.wait_for_log("dns: answering", Duration::from_millis(10));
        drop(daemon);
    }
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn reload_moves_the_listen_address_and_refuses_a_bad_dns_section() {
    let prefix = "lbdnse";
    {
        let lab = DnsLab::new(prefix);
        let daemon = start(&lab);
        let name = www(&lab);
        let lb = lab.lab.topo.lb();
        let socket = api_socket_for(lb);
        lab.wait_for_answer(&name, &[lab.vip(), lab.backend(1)], BOUND)
            .unwrap();

        // A bad [dns] is refused with its position; the old one keeps answering.
        let good = lab.config(&[format!("{}:53", lab.server())], &names(&lab));
        let bad = good.replace(&format!("zone = \"{ZONE}\""), "zone = \"svc.example\"");
        daemon.rewrite_config(lb, &bad).unwrap();
        let refused = lb_reload(&socket).expect_err("a zone without its dot is refused");
        let message = format!("{refused:#}");
        assert!(message.contains("does not end in `.`"), "{message}");
        assert!(
            message.contains(".toml:") || message.contains(":"),
            "{message}"
        );
        lab.wait_for_answer(&name, &[lab.vip(), lab.backend(1)], BOUND)
            .expect("old config still answers");

        // Moving the listen port: the new one answers, the old one is closed.
        let moved = lab.config(&[format!("{}:5353", lab.server())], &names(&lab));
        daemon.rewrite_config(lb, &moved).unwrap();
        let report = lb_reload(&socket).expect("reload");
        assert!(report.contains("now answering on"), "{report}");
        let answer = lab.dig(5353, &name, "A", &[]).expect("dig on 5353");
        assert_eq!(answer.answers.len(), 2, "{answer:?}");
        let old = dig_in(lab.client(), lab.server(), 53, &name, "A", &[]);
        assert!(old.is_err(), "port 53 still answers: {old:?}");
        let status = lb_status(&socket).unwrap();
        assert_eq!(
            status["dns"]["listen"],
            serde_json::json!([format!("{}:5353", lab.server())])
        );

        // Removing [dns] stops the responder.
        let without = moved.split("\n[dns]").next().unwrap().to_owned();
        daemon.rewrite_config(lb, &without).unwrap();
        lb_reload(&socket).expect("reload without dns");
        assert!(lb_status(&socket).unwrap()["dns"].is_null());
        drop(daemon);
    }
    assert!(
        leftovers(prefix).is_empty(),
        "namespaces left: {:?}",
        leftovers(prefix)
    );
}
