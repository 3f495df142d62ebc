//! Adam with bias correction (Kingma & Ba; PyTorch's `torch.optim.Adam`
//! semantics, L2 weight decay added to the gradient):
//!
//! ```text
//! d = g + λ·θ
//! m = β₁·m + (1 − β₁)·d          v = β₂·v + (1 − β₂)·d²
//! θ = θ − (lr / (1 − β₁ᵗ)) · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + ε)
//! ```
//!
//! Freeze masks: the new `m` and `v` are multiplied by the mask, so a frozen
//! element has zero moments and its update is skipped: it keeps its bits, as
//! with [`crate::Sgd`]. The state slots are PyTorch's names, `exp_avg` (m)
//! and `exp_avg_sq` (v); METHOD §10's loss-aware quantizers read
//! `exp_avg_sq` (without bias correction, as METHOD decides) after every
//! step. On the CPU the update is three in-place passes per parameter; on
//! other devices tensor ops.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use qgrad_accum::FreezeMask;

use crate::cpu::{mul_assign, AdamDescend, MomentUpdate};
use crate::{
    check_masks, checked_state, slot_index, OptimError, Optimizer, OptimizerConfig, Result,
};

/// The first-moment slot (`m`).
pub const EXP_AVG: &str = "exp_avg";
/// The second-moment slot (`v`).
pub const EXP_AVG_SQ: &str = "exp_avg_sq";

/// Adam over named parameters.
#[derive(Debug)]
pub struct Adam {
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
}

impl Adam {
    /// Zero moments for `params`.
    pub fn new(
        params: &[(String, Var)],
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        OptimizerConfig::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
        }
        .validate()?;
        let zeros = || {
            params
                .iter()
                .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
            params: params.to_vec(),
            m: zeros()?,
            v: zeros()?,
            steps: 0,
        })
    }

    /// The second moment `v` of `param` (no bias correction).
    pub fn second_moment(&self, param: &str) -> Option<&Tensor> {
        Optimizer::state(self, param, EXP_AVG_SQ)
    }

    fn update(&mut self, i: usize, g: &Tensor, lr: f64, mask: Option<&FreezeMask>) -> Result<()> {
        let t = self.steps as i32 + 1;
        let c1 = 1.0 - self.beta1.powi(t);
        let c2 = 1.0 - self.beta2.powi(t);
        let theta = self.params[i].1.as_tensor();
        let fused = theta.device().is_cpu()
            && theta.dtype() == DType::F32
            && theta.is_contiguous()
            && self.m[i].is_contiguous()
            && self.v[i].is_contiguous();
        if fused {
            let g = g.contiguous()?;
            for (moment, beta, square) in [
                (&self.m[i], self.beta1, false),
                (&self.v[i], self.beta2, true),
            ] {
                moment.inplace_op3(
                    &g,
                    theta,
                    &MomentUpdate {
                        beta: beta as f32,
                        weight_decay: self.weight_decay as f32,
                        square,
                    },
                )?;
                if let Some(mask) = mask {
                    moment.inplace_op2(mask.tensor(), &mul_assign())?;
                }
            }
            theta.inplace_op3(
                &self.m[i],
                &self.v[i],
                &AdamDescend {
                    step_size: (lr / c1) as f32,
                    sqrt_c2: c2.sqrt() as f32,
                    eps: self.eps as f32,
                },
            )?;
            return Ok(());
        }
        let theta = &theta.detach();
        let g = &g.detach();
        let d = if self.weight_decay != 0.0 {
            (g + theta.affine(self.weight_decay, 0.0)?)?
        } else {
            g.clone()
        };
        let mut m = (self.m[i].affine(self.beta1, 0.0)? + d.affine(1.0 - self.beta1, 0.0)?)?;
        let mut v =
            (self.v[i].affine(self.beta2, 0.0)? + d.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
        if let Some(mask) = mask {
            m = mask.apply(&m)?;
            v = mask.apply(&v)?;
        }
        let denom = v.sqrt()?.affine(1.0 / c2.sqrt(), self.eps)?;
        let updated = (theta - (m.affine(lr / c1, 0.0)? / denom)?)?;
        // Frozen elements (m = 0) keep their bits.
        let moving = m.ne(0f32)?;
        let updated = moving.where_cond(&updated, theta)?;
        self.params[i].1.set(&updated)?;
        self.m[i] = m;
        self.v[i] = v;
        Ok(())
    }
}

impl Optimizer for Adam {
    fn config(&self) -> OptimizerConfig {
        OptimizerConfig::Adam {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    fn reconfigure(&mut self, config: &OptimizerConfig) -> Result<()> {
        config.validate()?;
        match *config {
            OptimizerConfig::Adam {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                (self.beta1, self.beta2, self.eps) = (beta1, beta2, eps);
                self.weight_decay = weight_decay;
                Ok(())
            }
            _ => Err(OptimError::Config(format!(
                "cannot continue an Adam run with {}",
                config.name()
            ))),
        }
    }

    fn step(&mut self, grads: &GradStore, lr: f64, masks: &[Option<FreezeMask>]) -> Result<()> {
        check_masks(masks, self.params.len())?;
        for i in 0..self.params.len() {
            let Some(g) = grads.get(self.params[i].1.as_tensor()) else {
                continue;
            };
            let g = g.clone();
            let mask = masks.get(i).and_then(Option::as_ref).cloned();
            self.update(i, &g, lr, mask.as_ref())?;
        }
        self.steps += 1;
        Ok(())
    }

    fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    fn slots(&self) -> &'static [&'static str] {
        &[EXP_AVG, EXP_AVG_SQ]
    }

    fn state(&self, param: &str, slot: &str) -> Option<&Tensor> {
        let i = self.params.iter().position(|(n, _)| n == param)?;
        match slot {
            EXP_AVG => Some(&self.m[i]),
            EXP_AVG_SQ => Some(&self.v[i]),
            _ => None,
        }
    }

    fn set_state(&mut self, param: &str, slot: &str, value: &Tensor) -> Result<()> {
        let i = slot_index(&self.params, self.slots(), param, slot)?;
        let value = checked_state(&self.params[i], slot, value)?;
        if slot == EXP_AVG {
            self.m[i] = value;
        } else {
            self.v[i] = value;
        }
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Adam in f64 by the formula, for `loss = Σ c·w²/2` (gradient `c·w`).
    fn reference(
        init: &[f64],
        c: &[f64],
        steps: usize,
        lr: f64,
        wd: f64,
        frozen: &[bool],
    ) -> Vec<f64> {
        let (b1, b2, eps) = (0.9, 0.999, 1e-8);
        let mut w = init.to_vec();
        let (mut m, mut v) = (vec![0.0; w.len()], vec![0.0; w.len()]);
        for t in 1..=steps as i32 {
            for k in 0..w.len() {
                if frozen[k] {
                    continue;
                }
                let d = c[k] * w[k] + wd * w[k];
                m[k] = b1 * m[k] + (1.0 - b1) * d;
                v[k] = b2 * v[k] + (1.0 - b2) * d * d;
                let denom = v[k].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                w[k] -= lr / (1.0 - b1.powi(t)) * m[k] / denom;
            }
        }
        w
    }

    fn run(device: &Device, strided: bool, frozen: &[bool]) -> Vec<f32> {
        let init = [0.5f32, -1.5, 2.0, 0.25];
        let c = [1.0f32, 0.5, 2.0, 3.0];
        let w = Var::new(&init, device).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut opt = Adam::new(&params, 0.9, 0.999, 1e-8, 0.01).unwrap();
        let mask = FreezeMask::from_frozen(&[4], frozen, device).unwrap();
        let ct = Tensor::new(&c, device).unwrap();
        for _ in 0..5 {
            let x = if strided {
                // A transposed (non-contiguous) use of w gives the same gradient.
                w.as_tensor()
                    .reshape((2, 2))
                    .unwrap()
                    .t()
                    .unwrap()
                    .t()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
            } else {
                w.as_tensor().clone()
            };
            let loss = (x.sqr().unwrap() * &ct)
                .unwrap()
                .sum_all()
                .unwrap()
                .affine(0.5, 0.0)
                .unwrap();
            opt.step(&loss.backward().unwrap(), 0.05, &[Some(mask.clone())])
                .unwrap();
        }
        assert_eq!(opt.steps(), 5);
        w.as_tensor().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn matches_the_bias_corrected_formula_and_keeps_frozen_bits() {
        let frozen = [false, true, false, false];
        let expected = reference(
            &[0.5, -1.5, 2.0, 0.25],
            &[1.0, 0.5, 2.0, 3.0],
            5,
            0.05,
            0.01,
            &frozen,
        );
        for strided in [false, true] {
            let got = run(&Device::Cpu, strided, &frozen);
            for k in 0..4 {
                assert!(
                    (got[k] as f64 - expected[k]).abs() < 1e-5,
                    "{got:?} vs {expected:?}"
                );
            }
            assert_eq!(got[1].to_bits(), (-1.5f32).to_bits());
        }
    }

    #[test]
    fn state_by_name_and_resume() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, 2.0], &dev).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut opt = Adam::new(&params, 0.9, 0.999, 1e-8, 0.0).unwrap();
        let grads = w
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        opt.step(&grads, 0.01, &[]).unwrap();
        let v = opt.second_moment("w").unwrap().to_vec1::<f32>().unwrap();
        assert!((v[1] - 0.001 * 16.0).abs() < 1e-5);
        assert!(opt.state("w", "momentum").is_none());
        assert!(opt
            .set_state("w", EXP_AVG, &Tensor::zeros(3, DType::F32, &dev).unwrap())
            .is_err());
        assert!(opt
            .set_state("x", EXP_AVG, &Tensor::zeros(2, DType::F32, &dev).unwrap())
            .is_err());
        assert!(opt
            .reconfigure(&OptimizerConfig::Sgd {
                momentum: 0.9,
                weight_decay: 0.0
            })
            .is_err());
        assert!(Adam::new(&params, 1.0, 0.999, 1e-8, 0.0).is_err());
        assert!(Adam::new(&params, 0.9, 0.999, 0.0, 0.0).is_err());
    }
}
