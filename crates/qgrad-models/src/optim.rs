//! SGD with momentum and weight decay (PyTorch semantics), freeze masks, and
//! learning-rate schedules.
//!
//! candle's `SGD` has neither momentum nor masks, so this is written out:
//! `d = g + λ·θ`, `v = μ·v + d`, `θ = θ − lr·v`. For a parameter with a
//! [`FreezeMask`] the new velocity is multiplied by the mask, so a frozen
//! element has `v = 0` (no gradient, no decay, no momentum) and
//! `θ − lr·0 = θ` keeps it bit-for-bit unchanged. On the CPU the update is
//! two in-place passes per parameter (velocity, then parameter) with no
//! temporaries; on other devices it is tensor ops on the parameters' device.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use qgrad_accum::FreezeMask;
use serde::{Deserialize, Serialize};

use crate::error::{ModelsError, Result};

/// Learning rate as a function of the epoch (constant within an epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    Constant,
    /// `lr · gamma^(epoch / every)`.
    Step {
        every: usize,
        gamma: f64,
    },
    /// `lr · gamma^(number of milestones ≤ epoch)`.
    MultiStep {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine annealing from `lr` (epoch 0) towards `min_lr` at `epochs`.
    Cosine {
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The learning rate of `epoch` (0-based) in a run of `epochs` epochs.
    pub fn lr_at(&self, base_lr: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            LrSchedule::Constant => base_lr,
            LrSchedule::Step { every, gamma } => {
                base_lr * gamma.powi((epoch / (*every).max(1)) as i32)
            }
            LrSchedule::MultiStep { milestones, gamma } => {
                base_lr * gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32)
            }
            LrSchedule::Cosine { min_lr } => {
                let t = epoch as f64 / epochs.max(1) as f64;
                min_lr + 0.5 * (base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelsError::Config(m));
        match self {
            LrSchedule::Step { every: 0, .. } => bad("step schedule needs every >= 1".into()),
            LrSchedule::Step { gamma, .. } | LrSchedule::MultiStep { gamma, .. }
                if !(gamma.is_finite() && *gamma > 0.0) =>
            {
                bad(format!("schedule gamma must be positive, got {gamma}"))
            }
            LrSchedule::Cosine { min_lr } if !(min_lr.is_finite() && *min_lr >= 0.0) => {
                bad(format!("cosine min_lr must be >= 0, got {min_lr}"))
            }
            _ => Ok(()),
        }
    }
}

/// SGD with momentum `μ` and weight decay `λ`; one velocity tensor per parameter.
#[derive(Debug)]
pub struct Sgd {
    pub momentum: f64,
    pub weight_decay: f64,
    params: Vec<(String, Var)>,
    velocity: Vec<Tensor>,
}

impl Sgd {
    /// Zero velocities for `params` (the order used by [`step`](Self::step)'s masks).
    pub fn new(params: &[(String, Var)], momentum: f64, weight_decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&momentum) {
            return Err(ModelsError::Config(format!(
                "momentum must be in [0, 1), got {momentum}"
            )));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(ModelsError::Config(format!(
                "weight decay must be >= 0, got {weight_decay}"
            )));
        }
        let velocity = params
            .iter()
            .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
            .collect::<Result<_>>()?;
        Ok(Self {
            momentum,
            weight_decay,
            params: params.to_vec(),
            velocity,
        })
    }

    /// One update with learning rate `lr`. `masks[i]` (aligned with the
    /// parameters given to `new`) freezes elements of parameter `i`. A
    /// parameter without a gradient is left alone (PyTorch skips it too).
    pub fn step(&mut self, grads: &GradStore, lr: f64, masks: &[Option<FreezeMask>]) -> Result<()> {
        if masks.len() != self.params.len() && !masks.is_empty() {
            return Err(ModelsError::Config(format!(
                "{} freeze masks for {} parameters",
                masks.len(),
                self.params.len()
            )));
        }
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
        Ok(())
    }

    /// `(name, velocity)` of every parameter (live tensors, on device).
    pub fn velocities(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params
            .iter()
            .zip(&self.velocity)
            .map(|((n, _), v)| (n.as_str(), v))
    }

    /// Restores the velocity of `name` (checkpoint resume).
    pub fn set_velocity(&mut self, name: &str, v: &Tensor) -> Result<()> {
        let i = self
            .params
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| ModelsError::Other(format!("no parameter '{name}' in optimizer")))?;
        let expected = self.params[i].1.dims();
        if v.dims() != expected {
            return Err(ModelsError::Shape {
                what: format!("{name} momentum"),
                expected: expected.to_vec(),
                got: v.dims().to_vec(),
            });
        }
        self.velocity[i] = v.to_device(self.params[i].1.device())?;
        Ok(())
    }
}

/// The contiguous f32 slice of a CPU storage.
fn f32_slice<'a>(
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: a contiguous f32 tensor is required"),
    }
}

fn f32_slice_mut<'a>(
    what: &str,
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: a contiguous f32 tensor is required"),
    }
}

/// In place on the velocity: `v = μ·v + (g + λ·θ)`, the same f32 operations
/// in the same order as the tensor-op path.
struct VelocityUpdate {
    momentum: f32,
    weight_decay: f32,
}

impl InplaceOp3 for VelocityUpdate {
    fn name(&self) -> &'static str {
        "qgrad-sgd-velocity"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        v_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
        theta: &CpuStorage,
        theta_layout: &Layout,
    ) -> candle_core::Result<()> {
        let v = f32_slice_mut(self.name(), v, v_layout)?;
        let g = f32_slice(self.name(), g, g_layout)?;
        let theta = f32_slice(self.name(), theta, theta_layout)?;
        if v.len() != g.len() || v.len() != theta.len() {
            candle_core::bail!("qgrad-sgd-velocity: length mismatch");
        }
        let (mu, lambda) = (self.momentum, self.weight_decay);
        for ((v, &g), &t) in v.iter_mut().zip(g).zip(theta) {
            let d = if lambda != 0.0 { g + t * lambda } else { g };
            *v = if mu != 0.0 { *v * mu + d } else { d };
        }
        Ok(())
    }
}

/// In place over two contiguous f32 tensors of one length: `f(dst[i], src[i])`
/// for every element. The mask and descend passes are this with different
/// element functions; monomorphised per closure, so each loop vectorises.
struct ZipAssign<F> {
    name: &'static str,
    f: F,
}

impl<F: Fn(&mut f32, f32) + Send + Sync> InplaceOp2 for ZipAssign<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        src: &CpuStorage,
        src_layout: &Layout,
    ) -> candle_core::Result<()> {
        let dst = f32_slice_mut(self.name, dst, dst_layout)?;
        let src = f32_slice(self.name, src, src_layout)?;
        if dst.len() != src.len() {
            candle_core::bail!("{}: length mismatch", self.name);
        }
        for (d, &v) in dst.iter_mut().zip(src) {
            (self.f)(d, v);
        }
        Ok(())
    }
}

/// In place: `dst *= src` (a freeze mask of 1.0/0.0).
fn mul_assign() -> ZipAssign<impl Fn(&mut f32, f32) + Send + Sync> {
    ZipAssign {
        name: "qgrad-mul-assign",
        f: |d: &mut f32, m: f32| *d *= m,
    }
}

/// In place on the parameter: `θ = θ − lr·v`.
fn descend(lr: f32) -> ZipAssign<impl Fn(&mut f32, f32) + Send + Sync> {
    ZipAssign {
        name: "qgrad-sgd-descend",
        // A zero step leaves θ alone bit for bit: `-0.0 - 0.0` would turn a
        // frozen (pruned) -0.0 into +0.0. Written as a select, not a
        // conditional store, so that it vectorises (the branchy form took
        // 6 % of a LeNet-300-100 step).
        f: move |t: &mut f32, v: f32| *t = if v != 0.0 { *t - v * lr } else { *t },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert!(LrSchedule::Step {
            every: 0,
            gamma: 0.1
        }
        .validate()
        .is_err());
        assert!(Sgd::new(&[], 1.5, 0.0).is_err());
    }
}
