//! The `lb` binary's subcommands beyond `run` and `check-config`.

pub mod control;
pub mod decap;
pub mod detach;
