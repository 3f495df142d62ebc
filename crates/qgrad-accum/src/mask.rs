//! Per-element freeze masks (METHOD.md §4): 1.0 = trainable, 0.0 = frozen.

use candle_core::{DType, Device, Tensor};

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

#[cfg(test)]
mod tests {
    use super::*;

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
