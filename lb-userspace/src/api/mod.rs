//! The control API: HTTP/1.1 with JSON on a Unix socket (config `api`, default
//! [`DEFAULT_API`](crate::config::DEFAULT_API)), mode 0600 so only root talks to it.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /status` | 200, a [`StatusReport`](model::StatusReport) |
//! | `POST /vips/{vip}/backends/{backend}/drain` | 200 `{"ok":true}`: weight 0, no new flows, existing ones stay |
//! | `POST /vips/{vip}/backends/{backend}/disable` | 200 `{"ok":true}`: forced down |
//! | `POST /vips/{vip}/backends/{backend}/enable` | 200 `{"ok":true}`: back to health-checked |
//! | `POST /reload` | 200, a [`ReloadReport`](model::ReloadReport); 422 `{"error":"FILE:LINE:COL: ..."}` when the file is refused (the old config keeps running) |
//!
//! `{vip}` is the VIP's name, `{backend}` the backend's address (`10.0.0.11`, `2001:db8::11`),
//! both percent-decoded. Every error is JSON too, `{"error":"..."}`: 404 for an unknown path, VIP
//! or backend, 400 for anything else the daemon refuses, 405 for a wrong method (with `Allow`),
//! 503 when the daemon's loop does not answer (it is shutting down).
//!
//! [`server`] answers on behalf of the daemon's loop, which owns the data plane: every request
//! becomes a [`Command`](model::Command) on a channel. [`client`] is what `lb status`, `lb drain`,
//! `lb disable`, `lb enable` and `lb reload` use.

pub mod client;
pub mod model;
pub mod server;

use model::Admin;

/// The last segment of the admin path that sets `admin`: `drain`, `disable` or `enable`.
pub fn action(admin: Admin) -> &'static str {
    match admin {
        Admin::Enabled => "enable",
        Admin::Drained => "drain",
        Admin::Disabled => "disable",
    }
}

/// The [`Admin`] an admin path's last segment asks for, if it is one.
pub fn admin_for(action: &str) -> Option<Admin> {
    match action {
        "enable" => Some(Admin::Enabled),
        "drain" => Some(Admin::Drained),
        "disable" => Some(Admin::Disabled),
        _ => None,
    }
}

/// The path of the request that sets backend `backend` of VIP `vip` to `admin`:
/// `/vips/{vip}/backends/{backend}/{action}`, both names percent-encoded.
pub fn admin_path(vip: &str, backend: &str, admin: Admin) -> String {
    format!(
        "/vips/{}/backends/{}/{}",
        encode_segment(vip),
        encode_segment(backend),
        action(admin)
    )
}

/// Percent-encodes every byte of `segment` but `A-Z a-z 0-9 - . _ ~ :`, so a name cannot add a
/// path segment (`/`) or end the path (`?`, `#`).
pub fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Undoes [`encode_segment`] (and any other percent-encoding); `None` if a `%` is not followed
/// by two hex digits or the result is not UTF-8.
pub fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip() {
        for name in ["web", "10.0.0.11", "2001:db8::11", "a/b?c#d%e f", "é"] {
            let encoded = encode_segment(name);
            assert!(!encoded.contains(['/', '?', '#', ' ']), "{encoded}");
            assert_eq!(decode_segment(&encoded).as_deref(), Some(name));
        }
        assert_eq!(encode_segment("2001:db8::11"), "2001:db8::11");
        assert_eq!(encode_segment("a/b"), "a%2Fb");
        assert_eq!(decode_segment("a%2fb").as_deref(), Some("a/b"));
        for bad in ["%", "%2", "%zz", "%+1", "%ff"] {
            assert_eq!(decode_segment(bad), None, "{bad}");
        }
    }

    #[test]
    fn actions_round_trip() {
        for admin in [Admin::Enabled, Admin::Drained, Admin::Disabled] {
            assert_eq!(admin_for(action(admin)), Some(admin));
        }
        assert_eq!(admin_for("drained"), None);
        assert_eq!(
            admin_path("web", "10.0.0.11", Admin::Drained),
            "/vips/web/backends/10.0.0.11/drain"
        );
    }
}
