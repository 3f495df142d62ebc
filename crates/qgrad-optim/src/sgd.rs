//! SGD with momentum and weight decay (PyTorch semantics) and freeze masks.
//!
//! candle's `SGD` has neither momentum nor masks, so this is written out:
//! `d = g + λ·θ`, `v = μ·v + d`, `θ = θ − lr·v`. For a parameter with a
//! [`FreezeMask`] the new velocity is multiplied by the mask, so a frozen
//! element has `v = 0` (no gradient, no decay, no momentum) and
//! `θ − lr·0 = θ` keeps it bit-for-bit unchanged. On the CPU the update is
//! two in-place passes per parameter (velocity, then parameter) with no
//! temporaries; on other devices it is tensor ops on the parameters' device.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use qgrad_accum::FreezeMask;

use crate::cpu::{descend, mul_assign, VelocityUpdate};
use crate::{check_masks, OptimError, Optimizer, OptimizerConfig, Result};

/// The state slot of SGD: the velocity, saved as `<param>.momentum`.
pub const MOMENTUM: &str = "momentum";

/// SGD with momentum `μ` and weight decay `λ`; one velocity tensor per parameter.
#[derive(Debug)]
pub struct Sgd {
    /// Momentum μ in [0, 1).
    pub momentum: f64,
    /// L2 weight decay λ ≥ 0, added to the gradient.
    pub weight_decay: f64,
    params: Vec<(String, Var)>,
    velocity: Vec<Tensor>,
    steps: u64,
}

impl Sgd {
    /// Zero velocities for `params` (the order used by [`step`](Self::step)'s masks).
    pub fn new(params: &[(String, Var)], momentum: f64, weight_decay: f64) -> Result<Self> {
        OptimizerConfig::Sgd {
            momentum,
            weight_decay,
        }
        .validate()?;
        let velocity = params
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
            .collect::<Result<_>>()?;
        Ok(Self {
            momentum,
            weight_decay,
            params: params.to_vec(),
            velocity,
            steps: 0,
        })
    }

    /// One update with learning rate `lr`. `masks[i]` (aligned with the
    /// parameters given to `new`) freezes elements of parameter `i`. A
    /// parameter without a gradient is left alone (PyTorch skips it too).
    pub fn step(&mut self, grads: &GradStore, lr: f64, masks: &[Option<FreezeMask>]) -> Result<()> {
        check_masks(masks, self.params.len())?;
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let mask = masks.get(i).and_then(Option::as_ref);
            let theta = var.as_tensor();
            let fused = theta.device().is_cpu()
                && theta.dtype() == DType::F32
                && theta.is_contiguous()
                && self.velocity[i].is_contiguous();
            if fused {
                // One pass for the velocity and one for the parameter, in
                // place: no temporaries, which for small networks cost more
                // than the arithmetic (LeNet-300-100's update took a quarter
                // of its step as six tensor ops per parameter).
                let g = g.contiguous()?;
                self.velocity[i].inplace_op3(
                    &g,
                    theta,
                    &VelocityUpdate {
                        momentum: self.momentum as f32,
                        weight_decay: self.weight_decay as f32,
                    },
                )?;
                if let Some(mask) = mask {
                    self.velocity[i].inplace_op2(mask.tensor(), &mul_assign())?;
                }
                theta.inplace_op2(&self.velocity[i], &descend(lr as f32))?;
                continue;
            }
            // Detached: the update must not record a backprop graph, or every
            // velocity would keep the previous step's tensors alive.
            let theta = &theta.detach();
            let g = &g.detach();
            let d = if self.weight_decay != 0.0 {
                (g + theta.affine(self.weight_decay, 0.0)?)?
            } else {
                g.clone()
            };
            let mut v = if self.momentum != 0.0 {
                (self.velocity[i].affine(self.momentum, 0.0)? + d)?
            } else {
                d
            };
            if let Some(mask) = mask {
                v = mask.apply(&v)?;
            }
            let updated = (theta - v.affine(lr, 0.0)?)?;
            var.set(&updated)?;
            self.velocity[i] = v;
        }
        self.steps += 1;
        Ok(())
    }

    /// `(name, velocity)` of every parameter (live tensors, on device).
    pub fn velocities(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params
            .iter()
            .zip(&self.velocity)
            .map(|((n, _), v)| (n.as_str(), v))
    }
}

impl Optimizer for Sgd {
    fn config(&self) -> OptimizerConfig {
        OptimizerConfig::Sgd {
            momentum: self.momentum,
            weight_decay: self.weight_decay,
        }
    }

    fn reconfigure(&mut self, config: &OptimizerConfig) -> Result<()> {
        config.validate()?;
        match *config {
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
            } => {
                self.momentum = momentum;
                self.weight_decay = weight_decay;
                Ok(())
            }
            _ => Err(OptimError::Config(format!(
                "cannot continue an SGD run with {}",
                config.name()
            ))),
        }
    }

    fn step(&mut self, grads: &GradStore, lr: f64, masks: &[Option<FreezeMask>]) -> Result<()> {
        Sgd::step(self, grads, lr, masks)
    }

    fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    fn slots(&self) -> &'static [&'static str] {
        &[MOMENTUM]
    }

    fn state(&self, param: &str, slot: &str) -> Option<&Tensor> {
        if slot != MOMENTUM {
            return None;
        }
        let i = self.params.iter().position(|(n, _)| n == param)?;
        Some(&self.velocity[i])
    }

    fn set_state(&mut self, param: &str, slot: &str, value: &Tensor) -> Result<()> {
        let i = crate::slot_index(&self.params, self.slots(), param, slot)?;
        self.velocity[i] = crate::checked_state(&self.params[i], slot, value)?;
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
    use crate::LrSchedule;
    use candle_core::Device;

    #[test]
    fn matches_pytorch_momentum_and_decay() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0], &dev).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut opt = Sgd::new(&params, 0.9, 0.1).unwrap();
        // loss = sum(w * c) -> grad = c
        let c = Tensor::new(&[0.5f32, 1.0], &dev).unwrap();
        let (mut theta, mut v) = ([1.0f64, -2.0], [0.0f64; 2]);
        for _ in 0..3 {
            let grads = w
                .as_tensor()
                .mul(&c)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            opt.step(&grads, 0.1, &[]).unwrap();
            for k in 0..2 {
                let g = [0.5, 1.0][k] + 0.1 * theta[k];
                v[k] = 0.9 * v[k] + g;
                theta[k] -= 0.1 * v[k];
            }
        }
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        for k in 0..2 {
            assert!(
                (got[k] as f64 - theta[k]).abs() < 1e-6,
                "{got:?} vs {theta:?}"
            );
        }
    }

    #[test]
    fn the_in_place_update_is_the_f32_formula_exactly() {
        // A 3x4 weight used transposed, so its gradient may come strided; a
        // mask on the second step.
        let dev = Device::Cpu;
        let init: Vec<f32> = (0..12).map(|k| (k as f32 - 5.5) * 0.37).collect();
        let w = Var::from_vec(init.clone(), (3, 4), &dev).unwrap();
        let x =
            Tensor::from_vec((0..8).map(|k| k as f32 * 0.1 - 0.3).collect(), (2, 4), &dev).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let (mu, lambda, lr) = (0.9f32, 5e-4f32, 0.05f32);
        let mut opt = Sgd::new(&params, mu as f64, lambda as f64).unwrap();
        let frozen = [
            true, false, false, true, false, false, false, false, true, false, false, false,
        ];
        let mask = FreezeMask::from_frozen(&[3, 4], &frozen, &dev).unwrap();
        let (mut theta, mut v) = (init, vec![0f32; 12]);
        for step in 0..3 {
            let y = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
            let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            let masks = if step == 0 {
                vec![None]
            } else {
                vec![Some(mask.clone())]
            };
            opt.step(&grads, lr as f64, &masks).unwrap();
            for k in 0..12 {
                v[k] = v[k] * mu + (g[k] + theta[k] * lambda);
                if step > 0 && frozen[k] {
                    v[k] = 0.0;
                }
                theta[k] -= v[k] * lr;
            }
            let got = w
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got, theta, "step {step}");
        }
    }

    #[test]
    fn frozen_elements_do_not_move_even_with_old_momentum() {
        let dev = Device::Cpu;
        let w = Var::new(&[1.0f32, -2.0, 3.0], &dev).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut opt = Sgd::new(&params, 0.9, 5e-4).unwrap();
        let loss = |w: &Var| w.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss(&w).backward().unwrap(), 0.1, &[]).unwrap();
        let before = w.as_tensor().to_vec1::<f32>().unwrap();
        let mask = FreezeMask::from_frozen(&[3], &[true, false, true], &dev).unwrap();
        for _ in 0..3 {
            opt.step(&loss(&w).backward().unwrap(), 0.1, &[Some(mask.clone())])
                .unwrap();
        }
        let after = w.as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(after[0].to_bits(), before[0].to_bits());
        assert_eq!(after[2].to_bits(), before[2].to_bits());
        assert_ne!(after[1], before[1]);
        let velocity = opt.velocities().next().unwrap().1;
        // No backprop graph is kept alive across steps (that leaked memory).
        assert!(!velocity.track_op());
        let v = velocity.to_vec1::<f32>().unwrap();
        assert_eq!((v[0], v[2]), (0.0, 0.0));
    }

    #[test]
    fn schedules() {
        let s = LrSchedule::Step {
            every: 2,
            gamma: 0.1,
        };
        assert!((s.lr_at(1.0, 3, 10) - 0.1).abs() < 1e-12);
        let c = LrSchedule::Cosine { min_lr: 0.0 };
        assert_eq!(c.lr_at(0.2, 0, 10), 0.2);
        assert!((c.lr_at(0.2, 5, 10) - 0.1).abs() < 1e-12);
        let m = LrSchedule::MultiStep {
            milestones: vec![2, 4],
            gamma: 0.5,
        };
        assert_eq!(m.lr_at(1.0, 4, 10), 0.25);
        let d = LrSchedule::DecayAfter {
            start: 10,
            gamma: 0.5,
        };
        assert_eq!(d.lr_at(1.0, 9, 50), 1.0);
        assert_eq!(d.lr_at(1.0, 10, 50), 0.5);
        assert_eq!(d.lr_at(1.0, 12, 50), 0.125);
        assert!(LrSchedule::DecayAfter {
            start: 1,
            gamma: -1.0
        }
        .validate()
        .is_err());
        assert!(LrSchedule::Step {
            every: 0,
            gamma: 0.1
        }
        .validate()
        .is_err());
        assert!(Sgd::new(&[], 1.5, 0.0).is_err());
    }
}
