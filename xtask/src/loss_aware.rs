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
//! LeNet-300-100 only (LeNet-5's convolutions make its runs several times
//! slower: a CLI command away), 10 epochs at full scale, 3 on the shipped
//! subset (so that `--quick` grows by well under a minute), 1 in the smoke
//! run.

use std::time::Instant;

use anyhow::Result;
use qgrad_models::data::Dataset;
use qgrad_models::methods::LossAwareOptions;
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
}

fn recipe(scale: Scale, arch: Arch) -> Option<LossAwareRecipe> {
    let all = vec![
        Quantizer::BinaryConnect,
        Quantizer::Bwn,
        Quantizer::Lab,
        Quantizer::Twn,
        Quantizer::LatExact,
        Quantizer::Laq {
            bits: 3,
            log: false,
        },
    ];
    let (epochs, quantizers) = match (scale, arch) {
        (Scale::Full, Arch::Lenet300100) => (10, all),
        (Scale::Full, _) => return None,
        (Scale::Quick, Arch::Lenet300100) => (3, all),
        (Scale::Quick, _) => return None,
        (Scale::Smoke, _) => (1, vec![Quantizer::Lab]),
    };
    Some(LossAwareRecipe {
        epochs,
        lr: 0.005,
        batch_size: 100,
        quantizers,
    })
}

/// The float network trained by the same loop and budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FloatRun {
    accuracy: f64,
    seconds: f64,
}

/// The loss-aware points of `ctx`'s model (cached like every other point).
pub(crate) fn points(ctx: &ModelContext, train_set: &Dataset) -> Result<Vec<ResultPoint>> {
    let Some(r) = recipe(ctx.opts.scale, ctx.arch) else {
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
    let float = match load_json::<FloatRun>(&float_path) {
        Some(f) => f,
        None => {
            let t0 = Instant::now();
            let mut float_config = config.clone();
            float_config.checkpoint_dir =
                Some(ctx.cache.join("runs").join(format!("la-float-{tag}")));
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
    for &q in &r.quantizers {
        let key = format!("la-{q}-{tag}");
        if let Some(p) = ctx.cached(&key, Role::Main) {
            out.push(p);
            continue;
        }
        let t0 = Instant::now();
        let mut run_config = config.clone();
        run_config.checkpoint_dir = Some(ctx.cache.join("runs").join(&key));
        let mut options = LossAwareOptions::new(q);
        options.seed = ctx.opts.seed;
        eprintln!("[{}] loss-aware: {q}, {} epochs", ctx.arch.name(), r.epochs);
        let run = LossAwareRun {
            arch: ctx.arch,
            config: run_config,
            options,
            start: Start::Scratch,
            device: ctx.opts.device.clone(),
        };
        let outcome = run_loss_aware(run, (train_set, &ctx.test), &mut [])?;
        let json = serde_json::json!({
            "quantizer": q.to_string(),
            "epochs": r.epochs,
            "lr": r.lr,
            "batch_size": r.batch_size,
            "optimizer": "adam",
        });
        let model = compress_loss_aware(&outcome, json)?;
        let label = format!("{q}, {} epochs, Adam lr {}", r.epochs, r.lr);
        let mut p = ctx.finish_point(&key, Method::LossAware, Role::Main, label, model, t0)?;
        // The comparison is the float network of the same loop and budget.
        p.float_accuracy = float.accuracy;
        save_json(&ctx.point_path(&key), &p)?;
        out.push(p);
    }
    Ok(out)
}
