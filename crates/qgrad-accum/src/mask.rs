//! Per-element freeze masks (METHOD.md §4): 1.0 = trainable, 0.0 = frozen.

use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};

use crate::{AccumError, Result};

/// Which elements of one parameter tensor may still change. Stored as an f32
/// tensor of 1.0 (trainable) and 0.0 (frozen) on the training device, so the
/// optimizer applies it with one multiply and no host copy.
#[derive(Debug, Clone)]
pub struct FreezeMask {
    mask: Tensor,
}

impl FreezeMask {
    /// Every element trainable.
    pub fn trainable(shape: &[usize], device: &Device) -> Result<Self> {
        Ok(Self {
            mask: Tensor::ones(shape, DType::F32, device)?,
        })
    }

    /// Elements with `frozen[i] == true` frozen (row-major order of `shape`).
    pub fn from_frozen(shape: &[usize], frozen: &[bool], device: &Device) -> Result<Self> {
        let count: usize = shape.iter().product();
        if frozen.len() != count {
            return Err(AccumError::InvalidArgument(format!(
                "freeze mask for shape {shape:?} needs {count} flags, got {}",
                frozen.len()
            )));
        }
        let values: Vec<f32> = frozen.iter().map(|&f| if f { 0.0 } else { 1.0 }).collect();
        Ok(Self {
            mask: Tensor::from_vec(values, shape, device)?,
        })
    }

    /// Wraps a tensor of 0.0/1.0 values (as saved in a checkpoint); any other
    /// value is an error.
    pub fn from_tensor(mask: Tensor) -> Result<Self> {
        if mask.dtype() != DType::F32 {
            return Err(AccumError::InvalidArgument(format!(
                "freeze mask must be f32, got {:?}",
                mask.dtype()
            )));
        }
        let values = mask.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = values.iter().find(|&&v| v != 0.0 && v != 1.0) {
            return Err(AccumError::InvalidArgument(format!(
                "freeze mask values must be 0 or 1, found {bad}"
            )));
        }
        Ok(Self {
            mask: mask.contiguous()?,
        })
    }

    /// The 1.0/0.0 tensor.
    pub fn tensor(&self) -> &Tensor {
        &self.mask
    }

    /// Shape of the parameter tensor the mask belongs to.
    pub fn dims(&self) -> &[usize] {
        self.mask.dims()
    }

    /// `frozen[i]` for every element (host copy).
    pub fn frozen_flags(&self) -> Result<Vec<bool>> {
        Ok(self
            .mask
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v == 0.0)
            .collect())
    }

    /// Number of frozen elements.
    pub fn num_frozen(&self) -> Result<usize> {
        let trainable = self.mask.sum_all()?.to_scalar::<f32>()? as usize;
        Ok(self.mask.elem_count() - trainable)
    }

    /// This mask with the elements flagged in `more` frozen too (frozen stays frozen).
    pub fn freeze_more(&self, more: &[bool]) -> Result<Self> {
        let extra = Self::from_frozen(self.dims(), more, self.mask.device())?;
        Ok(Self {
            mask: self.mask.mul(&extra.mask)?,
        })
    }

    /// Sets the frozen elements of `var` to +0.0 (a select, not a product:
    /// a frozen negative weight becomes +0.0, not −0.0). In place on a
    /// contiguous f32 CPU tensor, one pass and no allocation; elsewhere
    /// `var` gets a new tensor.
    pub fn zero_frozen(&self, var: &Var) -> Result<()> {
        let w = var.as_tensor();
        if w.dims() != self.dims() {
            return Err(AccumError::ShapeMismatch {
                name: "<freeze mask>".to_string(),
                expected: self.dims().to_vec(),
                got: w.dims().to_vec(),
            });
        }
        if w.device().is_cpu() && w.dtype() == DType::F32 && w.is_contiguous() {
            w.inplace_op2(&self.mask, &ZeroFrozen)?;
        } else {
            let w = w.detach();
            let keep = self.mask.ne(0f32)?;
            var.set(&keep.where_cond(&w, &w.zeros_like()?)?)?;
        }
        Ok(())
    }

    /// `t · mask`: zeroes the frozen elements of `t`.
    pub fn apply(&self, t: &Tensor) -> Result<Tensor> {
        if t.dims() != self.dims() {
            return Err(AccumError::ShapeMismatch {
                name: "<freeze mask>".to_string(),
                expected: self.dims().to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t.mul(&self.mask)?)
    }
}

/// In place: `w = mask ≠ 0 ? w : +0.0`.
struct ZeroFrozen;

impl InplaceOp2 for ZeroFrozen {
    fn name(&self) -> &'static str {
        "qgrad-zero-frozen"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(mask)) = (dst, mask) else {
            candle_core::bail!("qgrad-zero-frozen: f32 tensors required");
        };
        let (Some((d0, d1)), Some((m0, m1))) = (
            dst_layout.contiguous_offsets(),
            mask_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("qgrad-zero-frozen: contiguous tensors required");
        };
        let (dst, mask) = (&mut dst[d0..d1], &mask[m0..m1]);
        if dst.len() != mask.len() {
            candle_core::bail!("qgrad-zero-frozen: length mismatch");
        }
        for (w, &m) in dst.iter_mut().zip(mask) {
            *w = if m != 0.0 { *w } else { 0.0 };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_frozen_selects_in_place() {
        let dev = Device::Cpu;
        let m = FreezeMask::from_frozen(&[2, 2], &[true, false, true, false], &dev).unwrap();
        let var = Var::new(&[[-1f32, -2.], [3., 4.]], &dev).unwrap();
        m.zero_frozen(&var).unwrap();
        let got: Vec<u32> = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        // +0.0 for the frozen negative weight, not −0.0.
        assert_eq!(got, [0f32, -2., 0., 4.].map(f32::to_bits));
        let wrong = Var::new(&[1f32, 2.], &dev).unwrap();
        assert!(m.zero_frozen(&wrong).is_err());
        // Not f32: the select path, the same rule.
        let var64 = Var::new(&[[-1f64, -2.], [3., 4.]], &dev).unwrap();
        let mask64 = FreezeMask::from_frozen(&[2, 2], &[true, false, true, false], &dev).unwrap();
        mask64.zero_frozen(&var64).unwrap();
        assert_eq!(
            var64.as_tensor().to_vec2::<f64>().unwrap(),
            vec![vec![0.0, -2.0], vec![0.0, 4.0]]
        );
    }

    #[test]
    fn freeze_and_apply() {
        let dev = Device::Cpu;
        let m = FreezeMask::trainable(&[2, 2], &dev).unwrap();
        assert_eq!(m.num_frozen().unwrap(), 0);
        let m = m.freeze_more(&[true, false, false, false]).unwrap();
        let m = m.freeze_more(&[false, false, true, false]).unwrap();
        assert_eq!(m.frozen_flags().unwrap(), vec![true, false, true, false]);
        assert_eq!(m.num_frozen().unwrap(), 2);
        let t = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev).unwrap();
        let masked = m.apply(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(masked, vec![vec![0., 2.], vec![0., 4.]]);
        assert!(FreezeMask::from_frozen(&[2, 2], &[true], &dev).is_err());
        assert!(m
            .apply(&Tensor::zeros(3, DType::F32, &dev).unwrap())
            .is_err());
        let bad = Tensor::new(&[0.5f32, 1.0], &dev).unwrap();
        assert!(FreezeMask::from_tensor(bad).is_err());
    }
}
