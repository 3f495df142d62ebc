//! The reproduction's section for the third thesis (METHOD §10, §15):
//! loss-aware weight quantization (LAB, LAT, LAQ) beside its baselines
//! (BinaryConnect, BWN, TWN), every one trained by the same loop (Adam, a
//! straight-through gradient, weights clipped to [−1, 1]) and budget as a
//! float network, written as scaled codes and run from the file.
//!
//! Recipes (decided; METHOD §15's 50-epoch MLP recipe does not fit 2 cores in
//! the reproduction's budget): the models of the run (LeNet-300-100 and
//! LeNet-5 by default, so that the points sit on the accumulated-gradient
//! plots), Adam at lr 0.005 with cosine decay, batch 100, no weight decay;
//! 10 epochs at full scale, 3 on the shipped subset (so that `--quick` grows
//! by well under a minute), 1 in the smoke run. LeNet-300-100 runs every
//! quantizer; LeNet-5 (whose convolutions make a run several times slower)
//! the ternary ones at full scale only.
//!
//! The joint section (METHOD §13, [`Method::Joint`]) trains the same loop
//! under a non-zero budget κ that falls from 1 over the first half of the
//! epochs: ternary (exact LAT), ±α (LAB) and 3-bit (LAQ) non-zeros on
//! LeNet-300-100, ternary on LeNet-5, ranked by the curvature score
//! `D·W²`; on LeNet-5 also by the accumulated gradient `A` of the first
//! thesis: loss-aware ternary with accumulated-gradient pruning.
//! The last rows give layers their own κ (METHOD §13's budget is per
//! layer: LeNet-300-100's 1,000-weight `fc3`, LeNet-5's 500-weight `conv1`
//! denser, LeNet-5's `fc1` sparser) and store the biases at 8 (or 6) bits: the
//! smallest files, for the 100x and 200x targets; LeNet-5's last
//! row starts from the section's float network (same loop, budget and seed)
//! instead of a fresh one.

use std::time::Instant;

use anyhow::Result;
use qgrad_models::data::Dataset;
use qgrad_models::methods::{Importance, LossAwareOptions, SparseBudget};
use qgrad_models::train::OptimizerKind;
use qgrad_models::{Arch, TrainConfig};
use qgrad_pipeline::in_training::Start;
use qgrad_pipeline::{compress_loss_aware, run_loss_aware, train_float, LossAwareRun};
use qgrad_scaled::Method as Quantizer;
use serde::{Deserialize, Serialize};

use crate::reproduce::{load_json, save_json, ModelContext, Scale};
use crate::results::{Method, ResultPoint, Role};

/// The loss-aware runs of one model at one scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LossAwareRecipe {
    epochs: usize,
    lr: f64,
    batch_size: usize,
    quantizers: Vec<Quantizer>,
    /// Joint quantization and sparsification.
    joint: Vec<JointRun>,
}

/// One joint run: the quantizer, its budget, and the biases' width.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct JointRun {
    quantizer: Quantizer,
    kappa: f64,
    importance: Importance,
    /// Layers with their own κ (METHOD §13's budget is per layer).
    layers: &'static [(&'static str, f64)],
    /// The biases' width in the file (32: f32).
    bias_bits: u8,
    /// Fix the kept set at the end of the budget ramp
    /// (`SparseBudget::freeze_after_ramp`).
    freeze: bool,
    /// Its own epochs and budget ramp, in place of the recipe's epochs and
    /// half of them.
    schedule: Option<(usize, f64)>,
    /// Start from the float network of the same loop, budget and seed (the
    /// section's baseline) instead of a fresh one.
    from_float: bool,
}

impl JointRun {
    /// κ for every layer, f32 biases.
    fn uniform(quantizer: Quantizer, kappa: f64, importance: Importance) -> Self {
        JointRun {
            quantizer,
            kappa,
            importance,
            layers: &[],
            bias_bits: 32,
            freeze: false,
            schedule: None,
            from_float: false,
        }
    }

    /// Its non-zero budget under a recipe of `epochs`.
    fn budget(&self, epochs: usize) -> SparseBudget {
        let (_, ramp) = self.epochs_and_ramp(epochs);
        let mut budget = SparseBudget::uniform(self.kappa, ramp, self.importance);
        for &(layer, kappa) in self.layers {
            budget.layers.insert(layer.to_string(), kappa);
        }
        budget.freeze_after_ramp = self.freeze;
        budget
    }

    /// Its epochs and budget ramp under a recipe of `epochs`.
    fn epochs_and_ramp(&self, epochs: usize) -> (usize, f64) {
        self.schedule.unwrap_or((epochs, epochs as f64 / 2.0))
    }

    /// The cache key's suffix for the per-layer budgets and bias width
    /// (empty for a uniform run with f32 biases, whose key is unchanged).
    fn suffix(&self) -> String {
        let mut out = String::new();
        for (layer, kappa) in self.layers {
            out.push_str(&format!("-{layer}k{kappa}"));
        }
        if self.bias_bits != 32 {
            out.push_str(&format!("-bias{}", self.bias_bits));
        }
        if self.freeze {
            out.push_str("-frozen");
        }
        if let Some((epochs, ramp)) = self.schedule {
            out.push_str(&format!("-e{epochs}r{ramp}"));
        }
        if self.from_float {
            out.push_str("-init");
        }
        out
    }
}

/// LeNet-5's per-layer budgets of the ternary joint run (conv2 and fc2 at
/// the common κ).
const L5_LAYERS: &[(&str, f64)] = &[("conv1", 0.5), ("fc1", 0.012)];

fn recipe(scale: Scale, arch: Arch, methods: (bool, bool)) -> Option<LossAwareRecipe> {
    let laq3 = Quantizer::Laq {
        bits: 3,
        log: false,
    };
    let laq4 = Quantizer::Laq {
        bits: 4,
        log: false,
    };
    let all = vec![
        Quantizer::BinaryConnect,
        Quantizer::Bwn,
        Quantizer::Lab,
        Quantizer::Twn,
        Quantizer::LatExact,
        laq3,
    ];
    let curv = Importance::Curvature;
    let accum = Importance::AccumulatedGradient;
    let lat = Quantizer::LatExact;
    let (epochs, quantizers, joint) = match (scale, arch) {
        (Scale::Full, Arch::Lenet300100) => (
            10,
            all,
            vec![
                JointRun::uniform(lat, 0.1, curv),
                JointRun::uniform(lat, 0.05, curv),
                JointRun::uniform(lat, 0.03, curv),
                JointRun::uniform(lat, 0.02, curv),
                JointRun::uniform(Quantizer::Lab, 0.05, curv),
                JointRun::uniform(Quantizer::Lab, 0.03, curv),
                JointRun::uniform(laq3, 0.05, curv),
                JointRun::uniform(laq3, 0.03, curv),
                // The smallest files: the last layer (1,000 weights) at its
                // own κ, biases at 8 bits.
                JointRun {
                    layers: &[("fc3", 0.3)],
                    bias_bits: 8,
                    ..JointRun::uniform(laq3, 0.03, curv)
                },
                // 4-bit levels, the kept set fixed after the ramp: the
                // 100x point within 0.5 pt (format version 5 makes room
                // for the fourth bit).
                JointRun {
                    layers: &[("fc3", 0.3)],
                    bias_bits: 8,
                    freeze: true,
                    ..JointRun::uniform(laq4, 0.03, curv)
                },
            ],
        ),
        (Scale::Full, Arch::Lenet5) => (
            10,
            vec![Quantizer::Twn, lat],
            vec![
                JointRun::uniform(lat, 0.1, curv),
                JointRun::uniform(lat, 0.05, curv),
                JointRun::uniform(lat, 0.02, curv),
                JointRun::uniform(lat, 0.1, accum),
                JointRun::uniform(lat, 0.05, accum),
                JointRun::uniform(lat, 0.02, accum),
                // Per-layer budgets (the small first convolution and last
                // layer kept denser, the 400,000-weight fc1 sparser) with
                // 8-bit biases.
                JointRun {
                    layers: L5_LAYERS,
                    bias_bits: 8,
                    ..JointRun::uniform(lat, 0.08, curv)
                },
                // 3-bit: fc1 sparser still and 6-bit biases, for 200x.
                JointRun {
                    layers: &[("conv1", 0.5), ("fc1", 0.009)],
                    bias_bits: 6,
                    ..JointRun::uniform(laq3, 0.08, curv)
                },
                // The same budgets at 4 bits with the kept set fixed after
                // a 5-epoch ramp, then 10 epochs of the fixed sparse
                // network: 200x at <= 1 % error in format version 5.
                JointRun {
                    layers: &[("conv1", 0.5), ("fc1", 0.009)],
                    bias_bits: 6,
                    freeze: true,
                    schedule: Some((15, 5.0)),
                    ..JointRun::uniform(laq4, 0.08, curv)
                },
                // The same, started from the trained float network: 200x
                // at <= 1 % error for every seed.
                JointRun {
                    layers: &[("conv1", 0.5), ("fc1", 0.009)],
                    bias_bits: 6,
                    freeze: true,
                    schedule: Some((15, 5.0)),
                    from_float: true,
                    ..JointRun::uniform(laq4, 0.08, curv)
                },
            ],
        ),
        (Scale::Full, _) => return None,
        (Scale::Quick, Arch::Lenet300100) => (3, all, vec![JointRun::uniform(lat, 0.1, curv)]),
        (Scale::Quick, _) => return None,
        (Scale::Smoke, _) => (
            1,
            vec![Quantizer::Lab],
            vec![JointRun::uniform(lat, 0.2, curv)],
        ),
    };
    let (dense, sparse) = methods;
    let r = LossAwareRecipe {
        epochs,
        lr: 0.005,
        batch_size: 100,
        quantizers: if dense { quantizers } else { Vec::new() },
        joint: if sparse { joint } else { Vec::new() },
    };
    (!r.quantizers.is_empty() || !r.joint.is_empty()).then_some(r)
}

/// The float network trained by the same loop and budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FloatRun {
    accuracy: f64,
    seconds: f64,
}

/// The loss-aware points of `ctx`'s model (cached like every other point).
pub(crate) fn points(ctx: &ModelContext, train_set: &Dataset) -> Result<Vec<ResultPoint>> {
    let wanted = (
        ctx.opts.methods.contains(&Method::LossAware),
        ctx.opts.methods.contains(&Method::Joint),
    );
    let Some(r) = recipe(ctx.opts.scale, ctx.arch, wanted) else {
        return Ok(Vec::new());
    };
    let mut config = TrainConfig::default_for(ctx.arch);
    config.epochs = r.epochs;
    config.lr = r.lr;
    config.batch_size = r.batch_size;
    config.weight_decay = 0.0;
    config.optimizer = OptimizerKind::ADAM;
    config.seed = ctx.opts.seed;
    config.progress = ctx.opts.progress;
    let tag = format!("e{}-lr{}-b{}", r.epochs, r.lr, r.batch_size);
    let float_path = ctx
        .cache
        .join("points")
        .join(format!("la-float-{tag}.json"));
    let float_dir = ctx.cache.join("runs").join(format!("la-float-{tag}"));
    let float_checkpoint = float_dir.join(qgrad_models::checkpoint::CHECKPOINT_FILE);
    // A run that starts from the float network needs its checkpoint, not
    // only its cached accuracy.
    let needs_checkpoint = r.joint.iter().any(|j| j.from_float) && !float_checkpoint.exists();
    let float = match load_json::<FloatRun>(&float_path).filter(|_| !needs_checkpoint) {
        Some(f) => f,
        None => {
            let t0 = Instant::now();
            let mut float_config = config.clone();
            float_config.checkpoint_dir = Some(float_dir.clone());
            eprintln!(
                "[{}] float network, Adam, {} epochs",
                ctx.arch.name(),
                r.epochs
            );
            let trained = train_float(
                ctx.arch,
                &float_config,
                &ctx.opts.device,
                (train_set, &ctx.test),
                &mut [],
                |_| {},
            )?;
            let f = FloatRun {
                accuracy: trained
                    .state
                    .history
                    .last()
                    .map_or(0.0, |e| e.test_accuracy),
                seconds: t0.elapsed().as_secs_f64(),
            };
            save_json(&float_path, &f)?;
            f
        }
    };
    let mut out = Vec::new();
    let runs = r
        .quantizers
        .iter()
        .map(|&q| (q, None))
        .chain(r.joint.iter().map(|j| (j.quantizer, Some(j))));
    for (q, joint) in runs {
        let epochs = joint.map_or(r.epochs, |j| j.epochs_and_ramp(r.epochs).0);
        let sparsity = joint.map(|j| j.budget(r.epochs));
        let bias_bits = joint.map_or(32, |j| j.bias_bits);
        let suffix = joint.map(JointRun::suffix).unwrap_or_default();
        let (key, method, label) = match &sparsity {
            None => (
                format!("la-{q}-{tag}"),
                Method::LossAware,
                format!("{q}, {} epochs, Adam lr {}", r.epochs, r.lr),
            ),
            Some(b) => {
                let by = match b.importance {
                    Importance::Curvature => "D·W²",
                    Importance::AccumulatedGradient => "A",
                };
                (
                    format!(
                        "joint-{q}-k{}-{}{suffix}-{tag}",
                        b.kappa,
                        serde_json::to_value(b.importance)?
                            .as_str()
                            .unwrap_or("importance")
                    ),
                    Method::Joint,
                    format!(
                        "{q}, κ {}{} by {by}{}{}, {} epochs",
                        b.kappa,
                        b.layers
                            .iter()
                            .map(|(l, k)| format!(" ({l} {k})"))
                            .collect::<String>(),
                        if bias_bits == 32 {
                            String::new()
                        } else {
                            format!(", {bias_bits}-bit biases")
                        },
                        if b.freeze_after_ramp {
                            format!(", kept set frozen after a {}-epoch ramp", b.ramp_epochs)
                        } else {
                            String::new()
                        },
                        epochs
                    ) + if joint.is_some_and(|j| j.from_float) {
                        ", from the float network"
                    } else {
                        ""
                    },
                )
            }
        };
        if let Some(p) = ctx.cached(&key, Role::Main) {
            out.push(p);
            continue;
        }
        let t0 = Instant::now();
        let mut run_config = config.clone();
        run_config.epochs = epochs;
        run_config.checkpoint_dir = Some(ctx.cache.join("runs").join(&key));
        let mut options = LossAwareOptions::new(q);
        options.seed = ctx.opts.seed;
        options.sparsity = sparsity.clone();
        options.bias_bits = bias_bits;
        eprintln!("[{}] {}: {label}", ctx.arch.name(), method.name());
        let start = if joint.is_some_and(|j| j.from_float) {
            Start::Checkpoint {
                path: &float_checkpoint,
                accum: qgrad_pipeline::AccumStart::Carry,
                evaluate: false,
            }
        } else {
            Start::Scratch
        };
        let run = LossAwareRun {
            arch: ctx.arch,
            config: run_config,
            options,
            start,
            device: ctx.opts.device.clone(),
        };
        let outcome = run_loss_aware(run, (train_set, &ctx.test), &mut [])?;
        let mut json = serde_json::json!({
            "quantizer": q.to_string(),
            "epochs": epochs,
            "lr": r.lr,
            "batch_size": r.batch_size,
            "optimizer": "adam",
        });
        if let Some(b) = &sparsity {
            json["sparsity"] = serde_json::to_value(b)?;
        }
        if bias_bits != 32 {
            json["bias_bits"] = serde_json::json!(bias_bits);
        }
        if joint.is_some_and(|j| j.from_float) {
            json["init"] = serde_json::json!("the float network of the same loop");
        }
        let model = compress_loss_aware(&outcome, json)?;
        let mut p = ctx.finish_point(&key, method, Role::Main, label, model, t0)?;
        // The comparison is the float network of the same loop and budget.
        p.float_accuracy = float.accuracy;
        save_json(&ctx.point_path(&key), &p)?;
        out.push(p);
    }
    Ok(out)
}
