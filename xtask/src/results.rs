//! The record of one reproduction run (`results.json`, `results.csv`), the
//! thesis numbers it is compared with, and the Pareto front of the
//! accuracy–compression trade-off.
//!
//! Everything REPORT.md and the plots show is read from a [`RunRecord`], so a
//! report can be regenerated from `results.json` alone and every number in it
//! comes from the run that wrote that file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;

/// The three methods of METHOD.md §3–5, loss-aware weight quantization
/// (§10, the third thesis) and joint quantization and sparsification (§13).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    PostTraining,
    InTraining,
    Combined,
    LossAware,
    Joint,
}

impl Method {
    /// The accumulated-gradient methods, the columns of the thesis table.
    pub const ALL: [Method; 3] = [Method::PostTraining, Method::InTraining, Method::Combined];
    /// Every method a reproduction can run.
    pub const EVERY: [Method; 5] = [
        Method::PostTraining,
        Method::InTraining,
        Method::Combined,
        Method::LossAware,
        Method::Joint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::PostTraining => "post-training",
            Method::InTraining => "in-training",
            Method::Combined => "combined",
            Method::LossAware => "loss-aware",
            Method::Joint => "joint",
        }
    }

    pub fn parse(s: &str) -> Result<Method> {
        match s.trim() {
            "post" | "post-training" => Ok(Method::PostTraining),
            "in" | "in-training" => Ok(Method::InTraining),
            "combined" => Ok(Method::Combined),
            "loss-aware" => Ok(Method::LossAware),
            "joint" => Ok(Method::Joint),
            other => anyhow::bail!(
                "unknown method {other:?}: expected post-training, in-training, combined, \
                 loss-aware or joint"
            ),
        }
    }
}

/// Compression ratios from the abstract of Gaopande's thesis (METHOD.md §8):
/// `(model, [post-training, in-training, combined])`.
pub const THESIS_RATIOS: [(&str, [f64; 3]); 4] = [
    ("lenet-300-100", [7.62, 22.08, 57.22]),
    ("lenet-5", [10.87, 21.05, 50.19]),
    ("alexnet", [6.39, 7.95, 13.15]),
    ("vgg-16", [12.43, 12.71, 13.53]),
];

/// The thesis ratio for a model and method, if the thesis gives one.
pub fn thesis_ratio(model: &str, method: Method) -> Option<f64> {
    let col = Method::ALL.iter().position(|m| *m == method)?;
    THESIS_RATIOS
        .iter()
        .find(|(m, _)| *m == model)
        .map(|(_, r)| r[col])
}

/// Deep Compression (Han et al., ICLR 2016), the literature anchor of
/// METHOD.md §8: `(model, ratio, error %)`.
pub const DEEP_COMPRESSION: [(&str, f64, f64); 2] =
    [("lenet-300-100", 40.0, 1.58), ("lenet-5", 39.0, 0.74)];

/// Whether a point is one of the headline cells (one per model and method) or
/// a point of the trade-off sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Main,
    Sweep,
}

/// One compressed model: how it was made, how big its file is, how accurate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultPoint {
    pub model: String,
    pub method: Method,
    pub role: Role,
    /// Short human-readable description of the options (e.g.
    /// `widths 16,8,4,2,0 kmeans global`).
    pub label: String,
    /// The options exactly as used (method-specific JSON).
    pub options: serde_json::Value,
    pub params: u64,
    /// Bytes of the compressed file on disk.
    pub file_bytes: u64,
    /// 32·params / (8·file_bytes).
    pub ratio: f64,
    /// Test accuracy of the quantized model (candle side), in [0, 1].
    pub accuracy: f64,
    /// Test accuracy of integer inference straight from the file, when run.
    pub file_accuracy: Option<f64>,
    pub float_accuracy: f64,
    /// Wall-clock seconds this point took (quantization, any training, export, evaluation).
    pub seconds: f64,
    /// The compressed file, relative to the output directory.
    pub file: String,
    /// Set by [`mark_pareto`]: no other point of the same model is at least
    /// as good on both axes and better on one.
    #[serde(default)]
    pub pareto: bool,
}

/// The float baseline of one model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub model: String,
    pub dataset_dir: String,
    pub train_images: usize,
    pub test_images: usize,
    pub params: u64,
    pub epochs: usize,
    /// Test accuracy per epoch.
    pub epoch_accuracy: Vec<f64>,
    pub float_accuracy: f64,
    pub train_seconds: f64,
    /// The training configuration (JSON of qgrad-models' TrainConfig).
    pub train_config: serde_json::Value,
}

/// One run of `cargo xtask reproduce` or `sweep`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub qgrad_version: String,
    pub git_commit: String,
    /// The command line as typed.
    pub command: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub elapsed_seconds: f64,
    pub seed: u64,
    pub threads: usize,
    pub device: String,
    /// The reproduce configuration (JSON of the options).
    pub config: serde_json::Value,
    pub baselines: Vec<Baseline>,
    pub points: Vec<ResultPoint>,
}

impl RunRecord {
    pub fn baseline(&self, model: &str) -> Option<&Baseline> {
        self.baselines.iter().find(|b| b.model == model)
    }

    /// Models in first-seen order (baselines first, then points).
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let names = self
            .baselines
            .iter()
            .map(|b| &b.model)
            .chain(self.points.iter().map(|p| &p.model));
        for m in names {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
        out
    }

    pub fn read(path: &Path) -> Result<RunRecord> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        write_atomic(path, text.as_bytes())
    }

    /// One row per point; accuracies in percent.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "model,method,role,label,params,file_bytes,ratio,accuracy_pct,file_accuracy_pct,float_accuracy_pct,accuracy_drop_pct,thesis_ratio,pareto,seconds,file\n",
        );
        for p in &self.points {
            let file_acc = p
                .file_accuracy
                .map(|a| format!("{:.2}", a * 100.0))
                .unwrap_or_default();
            let thesis = if p.role == Role::Main {
                thesis_ratio(&p.model, p.method)
                    .map(|r| format!("{r}"))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{:.3},{:.2},{},{:.2},{:.2},{},{},{:.2},{}",
                csv_field(&p.model),
                p.method.name(),
                match p.role {
                    Role::Main => "main",
                    Role::Sweep => "sweep",
                },
                csv_field(&p.label),
                p.params,
                p.file_bytes,
                p.ratio,
                p.accuracy * 100.0,
                file_acc,
                p.float_accuracy * 100.0,
                (p.float_accuracy - p.accuracy) * 100.0,
                thesis,
                p.pareto,
                p.seconds,
                csv_field(&p.file),
            );
        }
        out
    }

    pub fn write_csv(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_csv().as_bytes())
    }
}

/// Quotes a CSV field when it needs it (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Indices of the Pareto-optimal points among `(ratio, accuracy)` pairs, both
/// to be maximised, sorted by ratio ascending. Of exact duplicates only the
/// first is kept; NaN points are never on the front.
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..points.len())
        .filter(|&i| points[i].0.is_finite() && points[i].1.is_finite())
        .collect();
    // Highest ratio first; among equal ratios highest accuracy first; then index.
    order.sort_by(|&a, &b| {
        points[b]
            .0
            .total_cmp(&points[a].0)
            .then(points[b].1.total_cmp(&points[a].1))
            .then(a.cmp(&b))
    });
    let mut front = Vec::new();
    let mut best_accuracy = f64::NEG_INFINITY;
    for i in order {
        // Every point seen so far has a ratio >= this one, so this one is
        // dominated unless it is strictly more accurate than all of them.
        if points[i].1 > best_accuracy {
            front.push(i);
            best_accuracy = points[i].1;
        }
    }
    front.reverse();
    front
}

/// Sets `pareto` on every point: per model, over all its points (main and sweep).
pub fn mark_pareto(points: &mut [ResultPoint]) {
    let mut models: Vec<String> = points.iter().map(|p| p.model.clone()).collect();
    models.dedup();
    models.sort();
    models.dedup();
    for p in points.iter_mut() {
        p.pareto = false;
    }
    for model in models {
        let idx: Vec<usize> = (0..points.len())
            .filter(|&i| points[i].model == model)
            .collect();
        let pairs: Vec<(f64, f64)> = idx
            .iter()
            .map(|&i| (points[i].ratio, points[i].accuracy))
            .collect();
        for j in pareto_front(&pairs) {
            points[idx[j]].pareto = true;
        }
    }
}
