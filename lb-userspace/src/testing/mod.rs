//! Helpers shared by the crate's unit tests (compiled only under `cfg(test)`).

pub(crate) mod netns;
