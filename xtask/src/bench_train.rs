//! `cargo xtask bench-train` (placeholder until the side-by-side benchmark lands).
#[derive(clap::Args, Debug)]
pub struct BenchTrainArgs {}

pub fn run(_args: BenchTrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench-train is not built yet")
}
