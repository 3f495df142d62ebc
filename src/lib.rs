//! `qgrad`: the umbrella crate. It re-exports the workspace's crates so that a
//! user can depend on one name, and so that the top-level `tests/` and
//! `benches/` compile as targets of one package. Each crate is usable alone;
//! see ARCHITECTURE.md for which one owns what. A device that only runs
//! compressed files depends on `qgrad-runtime` (with `qgrad-csr`,
//! `qgrad-fixed` and `qgrad-data`) instead, which never compiles candle.
//!
//! ```
//! // The deployment side and the training side under one name.
//! use qgrad::runtime::Arch;
//! assert_eq!(Arch::Lenet300100.num_parameters(), 266_610);
//! assert_eq!(qgrad::models::Arch::Lenet5, "lenet-5".parse::<Arch>().unwrap());
//! ```
#![warn(missing_docs)]

pub use qgrad_accum as accum;
pub use qgrad_cluster as cluster;
pub use qgrad_collective as collective;
pub use qgrad_csr as csr;
pub use qgrad_data as data;
pub use qgrad_design as design;
pub use qgrad_fixed as fixed;
pub use qgrad_models as models;
pub use qgrad_ops as ops;
pub use qgrad_optim as optim;
pub use qgrad_pipeline as pipeline;
pub use qgrad_runtime as runtime;
pub use qgrad_scaled as scaled;
