//! `qgrad`: the umbrella crate. It re-exports the workspace's crates so that a
//! user can depend on one name, and so that the top-level `tests/` and
//! `benches/` compile as targets of one package. Each crate is usable alone;
//! see ARCHITECTURE.md for which one owns what.
pub use qgrad_accum as accum;
pub use qgrad_cluster as cluster;
pub use qgrad_csr as csr;
pub use qgrad_fixed as fixed;
pub use qgrad_models as models;
pub use qgrad_ops as ops;
