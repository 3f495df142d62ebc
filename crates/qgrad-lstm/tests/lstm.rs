//! qgrad-lstm end to end: the forward pass of every normalisation against a
//! direct scalar formula, per-gate scales, memorising a tiny corpus,
//! deterministic sampling, checkpoints that resume and round-trip, and the
//! errors of bad settings and inputs.

use candle_core::{Device, Tensor};
use qgrad_data::TextCorpus;
use qgrad_lstm::model::{self, Mode};
use qgrad_lstm::{
    gate_spectral_norms, generate, CharLstm, LstmConfig, LstmError, LstmRun, Normalisation,
    Sampling, TrainOptions,
};

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn small(norm: Normalisation) -> LstmConfig {
    LstmConfig {
        hidden: 3,
        seq_len: 4,
        batch: 3,
        norm,
        seed: 9,
        ..LstmConfig::default()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Standardises `v` (population variance) with `eps`.
fn standardise(v: &[f64], eps: f64) -> Vec<f64> {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    v.iter().map(|x| (x - mean) / (var + eps).sqrt()).collect()
}

/// Column-wise standardisation of `rows` (batch norm over the rows).
fn standardise_columns(rows: &[Vec<f64>], eps: f64) -> Vec<Vec<f64>> {
    let cols = rows[0].len();
    let mut out = rows.to_vec();
    for j in 0..cols {
        let col: Vec<f64> = rows.iter().map(|r| r[j]).collect();
        for (o, s) in out.iter_mut().zip(standardise(&col, eps)) {
            o[j] = s;
        }
    }
    out
}

/// The model's training-mode logits (time-major rows), written out in f64
/// straight from METHOD §11.
fn direct_logits(m: &CharLstm, tokens: &[u32], steps: usize, batch: usize) -> Vec<f64> {
    let (h, v) = (m.config.hidden, m.vocab);
    let g4 = 4 * h;
    let p = |name: &str| values(m.param(name).unwrap().as_tensor());
    let (mut wx, mut wh, bias) = (p(model::WX), p(model::WH), p(model::BIAS));
    let (ow, ob) = (p(model::OUT_WEIGHT), p(model::OUT_BIAS));
    let norm = m.config.norm;
    if norm == Normalisation::Weight {
        for (w, cols, g) in [
            (&mut wx, v, p(model::WX_NORM)),
            (&mut wh, h, p(model::WH_NORM)),
        ] {
            for r in 0..g4 {
                let row = &mut w[r * cols..(r + 1) * cols];
                let n = (row.iter().map(|x| x * x).sum::<f64>() + model::WN_EPS).sqrt();
                row.iter_mut().for_each(|x| *x *= g[r] / n);
            }
        }
    }
    let gains = matches!(
        norm,
        Normalisation::Layer | Normalisation::BatchPerStep | Normalisation::BatchShared
    );
    let (xg, hg) = if gains {
        (p(model::X_GAIN), p(model::H_GAIN))
    } else {
        (vec![1.0; g4], vec![1.0; g4])
    };
    let mut hs = vec![vec![0f64; h]; batch];
    let mut cs = vec![vec![0f64; h]; batch];
    let mut logits = Vec::new();
    for t in 0..steps {
        let xterm: Vec<Vec<f64>> = (0..batch)
            .map(|b| {
                let tok = tokens[t * batch + b] as usize;
                (0..g4).map(|r| wx[r * v + tok]).collect()
            })
            .collect();
        let rterm: Vec<Vec<f64>> = (0..batch)
            .map(|b| {
                (0..g4)
                    .map(|r| (0..h).map(|k| wh[r * h + k] * hs[b][k]).sum())
                    .collect()
            })
            .collect();
        let (xn, rn): (Vec<Vec<f64>>, Vec<Vec<f64>>) = match norm {
            Normalisation::Layer => (
                xterm
                    .iter()
                    .map(|r| standardise(r, model::LN_EPS))
                    .collect(),
                rterm
                    .iter()
                    .map(|r| standardise(r, model::LN_EPS))
                    .collect(),
            ),
            Normalisation::BatchPerStep | Normalisation::BatchShared => (
                standardise_columns(&xterm, model::BN_EPS),
                standardise_columns(&rterm, model::BN_EPS),
            ),
            _ => (xterm, rterm),
        };
        for b in 0..batch {
            let z: Vec<f64> = (0..g4)
                .map(|j| xg[j] * xn[b][j] + hg[j] * rn[b][j] + bias[j])
                .collect();
            for k in 0..h {
                let (i, f) = (sigmoid(z[k]), sigmoid(z[h + k]));
                let (g, o) = (z[2 * h + k].tanh(), sigmoid(z[3 * h + k]));
                cs[b][k] = f * cs[b][k] + i * g;
                hs[b][k] = o * cs[b][k].tanh();
            }
            for u in 0..v {
                logits.push(ob[u] + (0..h).map(|k| ow[u * h + k] * hs[b][k]).sum::<f64>());
            }
        }
    }
    logits
}

#[test]
fn every_normalisation_is_the_direct_formula() {
    let dev = Device::Cpu;
    let (steps, batch, vocab) = (4, 3, 5);
    let tokens: Vec<u32> = vec![0, 3, 1, 4, 2, 2, 1, 0, 4, 3, 3, 1];
    for norm in Normalisation::ALL {
        let m = CharLstm::new(&small(norm), vocab, &dev).unwrap();
        // Non-trivial gains, so that a swapped gain would show.
        if matches!(
            norm,
            Normalisation::Layer | Normalisation::BatchPerStep | Normalisation::BatchShared
        ) {
            for (name, k) in [(model::X_GAIN, 0.7f32), (model::H_GAIN, 1.3)] {
                let g = m.param(name).unwrap();
                let v: Vec<f32> = (0..12).map(|j| k + 0.05 * j as f32).collect();
                g.set(&Tensor::from_vec(v, 12, &dev).unwrap()).unwrap();
            }
        }
        let x = Tensor::from_slice(&tokens, 12, &dev).unwrap();
        let w = m.float_gate_weights().unwrap();
        let fwd = m.forward(&w, &x, steps, batch, None, Mode::Train).unwrap();
        let got = values(&fwd.logits);
        let want = direct_logits(&m, &tokens, steps, batch);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-4, "{norm}: logit {i}: {g} vs {w}");
        }
        assert_eq!(fwd.stats.is_some(), norm.batch(), "{norm}");
    }
}

#[test]
fn gate_matrices_get_one_scale_per_gate() {
    let dev = Device::Cpu;
    let config = LstmConfig {
        weights: Some("bwn".parse().unwrap()),
        ..small(Normalisation::None)
    };
    let mut run = LstmRun::new(&config, b"abcde", &dev).unwrap();
    let q = run.quantized_gates().unwrap().unwrap();
    for gates in &q {
        assert_eq!(gates.groups, 4);
        let w = values(run.model.param(&gates.name).unwrap().as_tensor());
        let per = w.len() / 4;
        for g in 0..4 {
            let block = &w[g * per..(g + 1) * per];
            let alpha = block.iter().map(|x| x.abs()).sum::<f64>() / per as f64;
            for (i, qv) in gates.quantized.values[g * per..(g + 1) * per]
                .iter()
                .enumerate()
            {
                assert!(
                    (f64::from(qv.abs()) - alpha).abs() < 1e-6,
                    "{} gate {g}: |Ŵ| = {qv}, mean |W| = {alpha}",
                    gates.name
                );
                assert_eq!(qv.is_sign_negative(), block[i] < 0.0);
            }
        }
    }
}

fn tiny_corpus() -> TextCorpus {
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(100);
    TextCorpus::from_bytes(text.as_bytes()).unwrap()
}

fn tiny_config(norm: Normalisation, weights: Option<&str>) -> LstmConfig {
    LstmConfig {
        hidden: 32,
        seq_len: 25,
        batch: 4,
        norm,
        weights: weights.map(|w| w.parse().unwrap()),
        lr: 0.01,
        epochs: 12,
        seed: 1,
        ..LstmConfig::default()
    }
}

#[test]
fn a_memorised_corpus_falls_below_half_a_bit_per_character() {
    let corpus = tiny_corpus();
    let split = corpus.split(4, 25).unwrap();
    for (norm, weights) in [
        (Normalisation::None, None),
        (Normalisation::Layer, Some("binary-connect")),
    ] {
        let config = tiny_config(norm, weights);
        let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu).unwrap();
        run.train(&split, &TrainOptions::default()).unwrap();
        let test = run.bpc(&split.test).unwrap();
        assert!(test < 0.5, "{}: test BPC {test}", config.label());
        assert_eq!(run.records.len(), 12);
        assert_eq!(run.grad_norms.len(), 12 * split.train.len());
    }
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let corpus = tiny_corpus();
    let split = corpus.split(4, 25).unwrap();
    let config = LstmConfig {
        epochs: 3,
        ..tiny_config(Normalisation::BatchPerStep, Some("twn"))
    };
    let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu).unwrap();
    run.train(&split, &TrainOptions::default()).unwrap();
    let s = Sampling {
        chars: 60,
        temperature: 0.8,
        seed: 4,
    };
    let a = generate(&mut run, b"the ", &s).unwrap();
    let b = generate(&mut run, b"the ", &s).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 60);
    assert!(a.iter().all(|c| corpus.vocab.contains(c)));
    let other = generate(&mut run, b"the ", &Sampling { seed: 5, ..s }).unwrap();
    assert_ne!(a, other, "another seed draws other text");
    // Bad requests are errors.
    assert!(matches!(
        generate(&mut run, b"the Z", &s),
        Err(LstmError::Config(m)) if m.contains("never had")
    ));
    assert!(generate(&mut run, b"", &s).is_err());
    assert!(generate(
        &mut run,
        b"t",
        &Sampling {
            temperature: 0.0,
            ..s
        }
    )
    .is_err());
}

#[test]
fn checkpoints_round_trip_and_resume_to_the_same_numbers() {
    let corpus = tiny_corpus();
    let split = corpus.split(4, 25).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (norm, weights) in [
        (Normalisation::BatchShared, Some("lab")),
        (Normalisation::Weight, None),
    ] {
        let config = LstmConfig {
            epochs: 3,
            ..tiny_config(norm, weights)
        };
        let whole = {
            let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu).unwrap();
            run.train(&split, &TrainOptions::default()).unwrap();
            run
        };
        let path = dir.path().join(format!("{}.safetensors", config.label()));
        let options = TrainOptions {
            checkpoint: Some(path.clone()),
            progress: false,
        };
        let two = LstmConfig {
            epochs: 2,
            ..config.clone()
        };
        let mut first =
            LstmRun::resume_or_new(&two, &corpus.vocab, &Device::Cpu, Some(&path)).unwrap();
        first.train(&split, &options).unwrap();
        let mut resumed =
            LstmRun::resume_or_new(&config, &corpus.vocab, &Device::Cpu, Some(&path)).unwrap();
        assert_eq!(resumed.resumed_from, Some(2));
        resumed.train(&split, &options).unwrap();
        for (a, b) in whole.records.iter().zip(&resumed.records) {
            assert_eq!(a.valid_bpc, b.valid_bpc, "{}", config.label());
            assert_eq!(a.train_bpc, b.train_bpc, "{}", config.label());
        }
        assert_eq!(whole.grad_norms, resumed.grad_norms);
        // The saved model evaluates as the live one.
        let mut loaded = LstmRun::load(&path, &Device::Cpu).unwrap();
        let mut live = resumed;
        assert_eq!(
            loaded.bpc(&split.test).unwrap(),
            live.bpc(&split.test).unwrap()
        );
        // Another setting on the same checkpoint is refused.
        let other = LstmConfig {
            hidden: 16,
            ..config.clone()
        };
        assert!(matches!(
            LstmRun::resume_or_new(&other, &corpus.vocab, &Device::Cpu, Some(&path)),
            Err(LstmError::Checkpoint { .. })
        ));
    }
}

#[test]
fn corrupt_checkpoints_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    assert!(matches!(
        LstmRun::load(&path, &Device::Cpu),
        Err(LstmError::Checkpoint { .. })
    ));
    let run = LstmRun::new(&small(Normalisation::Layer), b"abc", &Device::Cpu).unwrap();
    run.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    LstmRun::load(&path, &Device::Cpu).unwrap();
    // One flipped bit in the last tensor byte: the checksum catches it.
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 0x10;
    std::fs::write(&path, &flipped).unwrap();
    assert!(matches!(
        LstmRun::load(&path, &Device::Cpu),
        Err(LstmError::Checkpoint { message, .. }) if message.contains("checksum")
    ));
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(LstmRun::load(&path, &Device::Cpu).is_err());
    assert!(matches!(
        LstmRun::load(&dir.path().join("missing"), &Device::Cpu),
        Err(LstmError::Io { .. })
    ));
}

#[test]
fn bad_settings_are_errors() {
    let dev = Device::Cpu;
    let bad = [
        LstmConfig {
            hidden: 0,
            ..LstmConfig::default()
        },
        LstmConfig {
            lr: f64::NAN,
            ..LstmConfig::default()
        },
        LstmConfig {
            grad_clip: 0.0,
            ..LstmConfig::default()
        },
        LstmConfig {
            norm: Normalisation::BatchPerStep,
            batch: 1,
            ..LstmConfig::default()
        },
        LstmConfig {
            train_chunks: Some(0),
            ..LstmConfig::default()
        },
    ];
    for c in bad {
        assert!(
            matches!(CharLstm::new(&c, 10, &dev), Err(LstmError::Config(_))),
            "{c:?}"
        );
    }
    assert!(CharLstm::new(&small(Normalisation::None), 1, &dev).is_err());
    assert!("batch-norm".parse::<Normalisation>().is_err());
    // The serialised names are the command line's (older files: read too).
    for n in Normalisation::ALL {
        assert_eq!(serde_json::to_string(&n).unwrap(), format!("\"{n}\""));
    }
    let old: Normalisation = serde_json::from_str("\"batch-per-step\"").unwrap();
    assert_eq!(old, Normalisation::BatchPerStep);
    assert_eq!(
        "batch-shared".parse::<Normalisation>().unwrap(),
        Normalisation::BatchShared
    );
    // A corpus split for another shape is refused by train.
    let corpus = tiny_corpus();
    let split = corpus.split(5, 25).unwrap();
    let mut run =
        LstmRun::new(&tiny_config(Normalisation::None, None), &corpus.vocab, &dev).unwrap();
    assert!(run.train(&split, &TrainOptions::default()).is_err());
}

#[test]
fn a_binary_gate_matrix_has_spectral_norm_at_least_root_d() {
    let config = LstmConfig {
        hidden: 16,
        weights: Some("binary-connect".parse().unwrap()),
        ..small(Normalisation::None)
    };
    let mut run = LstmRun::new(&config, b"abcdefgh", &Device::Cpu).unwrap();
    let w = run.eval_weights().unwrap();
    let norms = gate_spectral_norms(&run.model, &w).unwrap();
    assert_eq!(norms.len(), 8);
    for n in &norms {
        assert!(n.value >= (n.columns as f64).sqrt() - 1e-6, "{n:?}");
    }
    // The float matrices, U(−1/4, 1/4), are far smaller.
    let f = gate_spectral_norms(&run.model, &run.model.float_gate_weights().unwrap()).unwrap();
    assert!(f.iter().all(|n| n.value < 2.0), "{f:?}");
    // Power iteration on a known matrix: diag(3, 1) has σ_max 3.
    let s = qgrad_lstm::spectral::largest_singular_value(&[3.0, 0.0, 0.0, 1.0], 2, 2);
    assert!((s - 3.0).abs() < 1e-9);
}

#[test]
fn the_compressed_file_round_trips_and_evaluates_as_the_live_model() {
    let corpus = tiny_corpus();
    let split = corpus.split(4, 25).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (norm, weights) in [
        (Normalisation::Layer, Some("lab")),
        (Normalisation::BatchPerStep, Some("ter-connect")),
        (Normalisation::Weight, Some("laq3")),
        (Normalisation::Weight, Some("ter-connect")),
        (Normalisation::None, None),
    ] {
        let config = LstmConfig {
            epochs: 2,
            ..tiny_config(norm, weights)
        };
        let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu).unwrap();
        run.train(&split, &TrainOptions::default()).unwrap();
        let path = dir.path().join(format!("{}.qgrad", config.label()));
        let size = qgrad_lstm::file::export(&mut run, &path).unwrap();
        let mut loaded = qgrad_lstm::file::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.trained, config);
        assert_eq!(
            loaded.run.bpc(&split.test).unwrap(),
            run.bpc(&split.test).unwrap(),
            "{}",
            config.label()
        );
        let s = Sampling {
            chars: 40,
            temperature: 1.0,
            seed: 3,
        };
        assert_eq!(
            generate(&mut loaded.run, b"the", &s).unwrap(),
            generate(&mut run, b"the", &s).unwrap()
        );
        // Gate weights: 1 bit (binary), 2 bits (ternary, dense), 3 bits.
        let gates: Vec<_> = size
            .tensors
            .iter()
            .filter(|t| t.name == "lstm.wx" || t.name == "lstm.wh")
            .collect();
        assert_eq!(gates.len(), 2);
        let bits = gates
            .iter()
            .map(|t| t.bits_per_parameter())
            .fold(0f64, f64::max);
        let want = match weights {
            Some("lab") => 1.0,
            Some("ter-connect") => 2.0,
            Some("laq3") => 3.0,
            _ => 32.0,
        };
        assert!(
            bits <= want * 1.02 + 0.1, // + four f32 scales on a small matrix
            "{}: {bits:.3} bits per gate weight",
            config.label()
        );
    }
}

#[test]
fn bad_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut run = LstmRun::new(&small(Normalisation::None), b"abcd", &Device::Cpu).unwrap();
    let path = dir.path().join("m.qgrad");
    qgrad_lstm::file::export(&mut run, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 9]).unwrap();
    assert!(matches!(
        qgrad_lstm::file::load(&path, &Device::Cpu),
        Err(LstmError::Csr(_))
    ));
    // A valid compressed file of another model.
    let other = dir.path().join("other.qgrad");
    let values = [1.0f32, 2.0];
    qgrad_csr::write_file(
        &other,
        &[qgrad_csr::TensorData {
            name: "w",
            shape: &[2],
            values: &values,
            widths: &[32, 32],
            exponent: None,
        }],
        &qgrad_csr::EncodeOptions::default(),
    )
    .unwrap();
    assert!(matches!(
        qgrad_lstm::file::load(&other, &Device::Cpu),
        Err(LstmError::NotAnLstm(_))
    ));
}

#[test]
fn an_unnormalised_binary_lstm_is_clipped_not_lost() {
    // ±1 gate matrices make the gradient explode through time, far past
    // what a sum of f32 squares holds; the norm is taken in f64 and the
    // clip brings the step back to 5.
    let corpus = tiny_corpus();
    let split = corpus.split(4, 100).unwrap();
    let config = LstmConfig {
        hidden: 256,
        seq_len: 100,
        epochs: 1,
        train_chunks: Some(2),
        ..tiny_config(Normalisation::None, Some("binary-connect"))
    };
    let mut run = LstmRun::new(&config, &corpus.vocab, &Device::Cpu).unwrap();
    run.train(&split, &TrainOptions::default()).unwrap();
    let r = &run.records[0];
    assert!(r.grad_norm_max > 1e20, "{r:?}");
    assert_eq!(r.clipped, 1.0);
    assert!(run.bpc(&split.test).unwrap().is_finite());
}
