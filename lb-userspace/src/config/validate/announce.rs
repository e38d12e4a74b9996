//! `[announce]`: the kernel routing table lb keeps its VIP routes in, and keepalived's health
//! file.

use std::path::PathBuf;

use toml::Spanned;

use super::super::raw::RawAnnounce;
use super::super::{AnnounceConfig, ConfigError};
use super::Validator;

/// The kernel's own tables: `unspec` (0), `default` (253), `main` (254) and `local` (255). lb
/// would share them with the system's routes, and a routing daemon exporting one of them would
/// announce far more than lb's VIPs.
const RESERVED_TABLES: [(u32, &str); 4] = [
    (0, "unspec (0 means no table)"),
    (253, "the kernel's `default` table"),
    (254, "the kernel's `main` table"),
    (255, "the kernel's `local` table"),
];

impl Validator<'_> {
    pub(super) fn announce(
        &self,
        raw: Option<&RawAnnounce>,
    ) -> Result<AnnounceConfig, ConfigError> {
        let Some(raw) = raw else {
            return Ok(AnnounceConfig::default());
        };
        let RawAnnounce {
            route_table,
            health_file,
        } = raw;
        Ok(AnnounceConfig {
            route_table: route_table
                .as_ref()
                .map(|value| self.route_table(value))
                .transpose()?,
            health_file: health_file
                .as_ref()
                .map(|value| self.health_file(value))
                .transpose()?,
        })
    }

    fn route_table(&self, value: &Spanned<i64>) -> Result<u32, ConfigError> {
        let table = self.integer_in("route_table", value, 0..=u32::MAX)?;
        match RESERVED_TABLES
            .iter()
            .find(|(reserved, _)| *reserved == table)
        {
            Some((_, what)) => Err(self.error(
                value.span(),
                format!(
                    "route_table {table} is {what}; give lb a table of its own (1..=252 or \
                     256 and above, e.g. 200) that your routing daemon exports"
                ),
            )),
            None => Ok(table),
        }
    }

    /// An absolute path of a file (keepalived reads it by path; the daemon may run from any
    /// directory).
    fn health_file(&self, value: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        let text = value.get_ref();
        let problem = if !text.starts_with('/') {
            Some("is not an absolute path")
        } else if text.contains('\0') {
            Some("contains a NUL character")
        } else if text.ends_with('/') {
            Some("names a directory, not a file")
        } else {
            None
        };
        match problem {
            Some(problem) => {
                Err(self.error(value.span(), format!("health_file `{text}` {problem}")))
            }
            None => Ok(PathBuf::from(text)),
        }
    }
}
