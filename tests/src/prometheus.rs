//! Reading a running `lb`'s metrics endpoint from inside its namespace.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::netns::NetNs;

/// The whole HTTP response (status line, headers, body) of `GET /metrics` at `address`, from
/// inside `namespace`. Panics if the endpoint cannot be reached.
pub fn scrape(namespace: &NetNs, address: &str) -> String {
    let address = address.to_owned();
    namespace.run(move || {
        let mut stream = TcpStream::connect(&address)
            .unwrap_or_else(|e| panic!("connect to the metrics endpoint {address}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
    })
}

/// The value of the sample line `series value` (`series` is the name with its labels, as
/// printed: `lb_vip_packets_total{vip="web"}`).
pub fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse::<f64>().expect("numeric sample") as u64)
}
