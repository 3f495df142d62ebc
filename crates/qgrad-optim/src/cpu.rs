//! In-place CPU element passes shared by the optimizers: each is one loop
//! over contiguous f32 slices with no temporaries (for small networks the
//! temporaries of tensor ops cost more than the arithmetic).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout};
use rayon::prelude::*;

/// Elements per parallel chunk. A pass over fewer than two chunks runs on
/// the calling thread: rayon's fork and join cost microseconds, a pass over
/// 32k elements tens of them. The passes are element-wise, so the chunking
/// never changes a bit of the result.
const CHUNK: usize = 1 << 15;

/// `f` over matching chunks of `dst` and `src` (equal lengths), in parallel
/// on rayon's pool when there are at least two chunks. Each optimizer pass
/// touches every parameter once; single-threaded they were most of a small
/// network's step on two cores, beside GEMMs that use both.
fn zip_chunks<F>(dst: &mut [f32], src: &[f32], f: F)
where
    F: Fn(&mut [f32], &[f32]) + Sync,
{
    if dst.len() < 2 * CHUNK {
        f(dst, src);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| f(d, s));
    }
}

/// [`zip_chunks`] with two sources.
fn zip3_chunks<F>(dst: &mut [f32], a: &[f32], b: &[f32], f: F)
where
    F: Fn(&mut [f32], &[f32], &[f32]) + Sync,
{
    if dst.len() < 2 * CHUNK {
        f(dst, a, b);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .zip(b.par_chunks(CHUNK))
            .for_each(|((d, a), b)| f(d, a, b));
    }
}

/// The contiguous f32 slice of a CPU storage.
pub(crate) fn f32_slice<'a>(
    what: &str,
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: a contiguous f32 tensor is required"),
    }
}

pub(crate) fn f32_slice_mut<'a>(
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
pub(crate) struct VelocityUpdate {
    pub(crate) momentum: f32,
    pub(crate) weight_decay: f32,
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
        zip3_chunks(v, g, theta, |v, g, theta| {
            for ((v, &g), &t) in v.iter_mut().zip(g).zip(theta) {
                let d = if lambda != 0.0 { g + t * lambda } else { g };
                *v = if mu != 0.0 { *v * mu + d } else { d };
            }
        });
        Ok(())
    }
}

/// In place over two contiguous f32 tensors of one length: `f(dst[i], src[i])`
/// for every element. The mask and descend passes are this with different
/// element functions; monomorphised per closure, so each loop vectorises.
pub(crate) struct ZipAssign<F> {
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
        zip_chunks(dst, src, |dst, src| {
            for (d, &v) in dst.iter_mut().zip(src) {
                (self.f)(d, v);
            }
        });
        Ok(())
    }
}

/// In place: `dst *= src` (a freeze mask of 1.0/0.0).
pub(crate) fn mul_assign() -> ZipAssign<impl Fn(&mut f32, f32) + Send + Sync> {
    ZipAssign {
        name: "qgrad-mul-assign",
        f: |d: &mut f32, m: f32| *d *= m,
    }
}

/// In place on the parameter: `θ = θ − lr·v`.
pub(crate) fn descend(lr: f32) -> ZipAssign<impl Fn(&mut f32, f32) + Send + Sync> {
    ZipAssign {
        name: "qgrad-sgd-descend",
        // A zero step leaves θ alone bit for bit: `-0.0 - 0.0` would turn a
        // frozen (pruned) -0.0 into +0.0. Written as a select, not a
        // conditional store, so that it vectorises (the branchy form took
        // 6 % of a LeNet-300-100 step).
        f: move |t: &mut f32, v: f32| *t = if v != 0.0 { *t - v * lr } else { *t },
    }
}

/// In place on a moment: `m = β·m + (1 − β)·d` (first moment) or
/// `v = β·v + (1 − β)·d²` (second), with `d = g + λ·θ`.
pub(crate) struct MomentUpdate {
    pub(crate) beta: f32,
    pub(crate) weight_decay: f32,
    pub(crate) square: bool,
}

impl InplaceOp3 for MomentUpdate {
    fn name(&self) -> &'static str {
        "qgrad-adam-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        m_layout: &Layout,
        g: &CpuStorage,
        g_layout: &Layout,
        theta: &CpuStorage,
        theta_layout: &Layout,
    ) -> candle_core::Result<()> {
        let m = f32_slice_mut(self.name(), m, m_layout)?;
        let g = f32_slice(self.name(), g, g_layout)?;
        let theta = f32_slice(self.name(), theta, theta_layout)?;
        if m.len() != g.len() || m.len() != theta.len() {
            candle_core::bail!("qgrad-adam-moment: length mismatch");
        }
        let (beta, lambda, square) = (self.beta, self.weight_decay, self.square);
        let keep = 1.0 - beta;
        zip3_chunks(m, g, theta, |m, g, theta| {
            for ((m, &g), &t) in m.iter_mut().zip(g).zip(theta) {
                let d = if lambda != 0.0 { g + t * lambda } else { g };
                let d = if square { d * d } else { d };
                *m = *m * beta + d * keep;
            }
        });
        Ok(())
    }
}

/// In place on the parameter: `θ = θ − (lr / c₁)·m / (sqrt(v) / sqrt(c₂) + ε)`
/// (PyTorch's order of operations), skipped where `m = 0` so that a frozen
/// element keeps its bits.
pub(crate) struct AdamDescend {
    pub(crate) step_size: f32,
    pub(crate) sqrt_c2: f32,
    pub(crate) eps: f32,
}

impl InplaceOp3 for AdamDescend {
    fn name(&self) -> &'static str {
        "qgrad-adam-descend"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        theta_layout: &Layout,
        m: &CpuStorage,
        m_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<()> {
        let theta = f32_slice_mut(self.name(), theta, theta_layout)?;
        let m = f32_slice(self.name(), m, m_layout)?;
        let v = f32_slice(self.name(), v, v_layout)?;
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("qgrad-adam-descend: length mismatch");
        }
        // The step is computed for every element and kept where m ≠ 0 (a
        // select, not a branch), so that the loop vectorises: written as a
        // branch it compiled to scalar `sqrtss`/`divss`, about 1 ms a step
        // for LeNet-300-100's 266k parameters (13 % of a loss-aware epoch).
        // The same IEEE operations either way, so the same bits.
        let (step_size, sqrt_c2, eps) = (self.step_size, self.sqrt_c2, self.eps);
        zip3_chunks(theta, m, v, |theta, m, v| {
            let n = theta.len();
            let (m, v) = (&m[..n], &v[..n]);
            for i in 0..n {
                let denom = v[i].sqrt() / sqrt_c2 + eps;
                let stepped = theta[i] - step_size * (m[i] / denom);
                theta[i] = if m[i] != 0.0 { stepped } else { theta[i] };
            }
        });
        Ok(())
    }
}
