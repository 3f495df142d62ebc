//! `cargo xtask curve LABEL=FILE,FILE… … --data DIR --out DIR`: the
//! accuracy-against-file-size curve of any compressed files, one line per
//! labelled series, every point measured from the file itself: its size on
//! disk and its accuracy run by the integer kernels on the full test set
//! (`CURVE.md`, `curve.json`, `curve.png`). What the reproduction's plots do
//! for its own runs, for files made by hand with the `qgrad` CLI: comparing
//! methods, or recipes of one method, by the bytes a device must hold.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use qgrad_csr::CompressedModel;
use qgrad_models::data::Dataset;
use qgrad_runtime::{DatasetKind, FileModel};
use serde::Serialize;

use crate::fsutil::write_atomic;
use crate::plot::{line_chart, Curve};

/// One labelled series of files.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// The legend's label.
    pub label: String,
    /// Its files.
    pub files: Vec<PathBuf>,
}

impl std::str::FromStr for Series {
    type Err = anyhow::Error;
    /// `LABEL=FILE,FILE,…`.
    fn from_str(s: &str) -> Result<Self> {
        let (label, files) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("'{s}': expected LABEL=FILE,FILE,..."))?;
        let files: Vec<PathBuf> = files
            .split(',')
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
            .collect();
        if label.trim().is_empty() || files.is_empty() {
            bail!("'{s}': a series needs a label and at least one file");
        }
        Ok(Series {
            label: label.trim().to_string(),
            files,
        })
    }
}

/// One file's point.
#[derive(Debug, Clone, Serialize)]
struct Point {
    series: String,
    file: String,
    method: Option<String>,
    bytes: u64,
    ratio: f64,
    /// Test accuracy of the file run by the integer kernels, in [0, 1].
    accuracy: f64,
    test_images: usize,
}

/// Measures every file of `series` on the test set found in `data` and
/// writes the report and the plot into `out`.
pub fn run(series: &[Series], data: &Path, out: &Path, title: &str) -> Result<()> {
    if series.is_empty() {
        bail!("no series: give at least one LABEL=FILE,...");
    }
    let mut tests: HashMap<DatasetKind, Dataset> = HashMap::new();
    let mut points = Vec::new();
    for s in series {
        for path in &s.files {
            let model = CompressedModel::read_file(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file = FileModel::new(&model)
                .with_context(|| format!("{} cannot be run", path.display()))?;
            let arch = file.arch();
            let test = match tests.entry(arch.dataset()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let (_, test) = qgrad_pipeline::data::load_datasets(arch, data, Some(1), None)?;
                    e.insert(test)
                }
            };
            let report = file
                .evaluate(test, qgrad_pipeline::EVAL_BATCH)
                .with_context(|| format!("running {}", path.display()))?;
            let size = model.size_report();
            eprintln!(
                "{}: {} bytes, {:.2}x, {:.2} %",
                path.display(),
                size.file_bytes,
                size.ratio,
                100.0 * report.accuracy
            );
            points.push(Point {
                series: s.label.clone(),
                file: path.display().to_string(),
                method: file.meta.method.clone(),
                bytes: size.file_bytes,
                ratio: size.ratio,
                accuracy: report.accuracy,
                test_images: report.total,
            });
        }
    }
    write_atomic(
        &out.join("curve.json"),
        serde_json::to_string_pretty(&points)?.as_bytes(),
    )?;
    write_atomic(&out.join("CURVE.md"), report(title, &points).as_bytes())?;
    let curves: Vec<Curve> = series
        .iter()
        .map(|s| {
            let mut xy: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.series == s.label)
                .map(|p| (p.bytes as f64 / 1024.0, 100.0 * p.accuracy))
                .collect();
            xy.sort_by(|a, b| a.0.total_cmp(&b.0));
            Curve {
                label: s.label.clone(),
                points: xy,
            }
        })
        .collect();
    let accs: Vec<f64> = points.iter().map(|p| 100.0 * p.accuracy).collect();
    let (lo, hi) = accs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &a| {
            (lo.min(a), hi.max(a))
        });
    let pad = ((hi - lo) * 0.08).max(0.05);
    line_chart(
        &out.join("curve.png"),
        title,
        ("file size (KiB)", "test accuracy from the file (%)"),
        &curves,
        ((lo - pad).max(0.0), (hi + pad).min(100.0)),
        // Accuracy rises with size and levels off: the empty corner.
        crate::plot::LegendAt::LowerRight,
    )
}

fn report(title: &str, points: &[Point]) -> String {
    let mut md = format!(
        "# {title}\n\nEvery point is a compressed file: its size on disk and its accuracy \
         run by the integer kernels (`cargo xtask curve`).\n\n\
         | series | file | method | bytes | ratio | accuracy | test images |\n\
         | --- | --- | --- | ---: | ---: | ---: | ---: |\n"
    );
    for p in points {
        let _ = writeln!(
            md,
            "| {} | `{}` | {} | {} | {:.2}x | {:.2} % | {} |",
            p.series,
            p.file,
            p.method.as_deref().unwrap_or(""),
            p.bytes,
            p.ratio,
            100.0 * p.accuracy,
            p.test_images
        );
    }
    md.push_str("\n![the curve](curve.png)\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_parse_and_reject_what_they_should() {
        let s: Series = "LAT-e + 8-bit A=a.qgz,b.qgz".parse().unwrap();
        assert_eq!(s.label, "LAT-e + 8-bit A");
        assert_eq!(s.files, [PathBuf::from("a.qgz"), PathBuf::from("b.qgz")]);
        for bad in ["a.qgz", "=a.qgz", "label=", " =a"] {
            assert!(bad.parse::<Series>().is_err(), "{bad}");
        }
    }
}
