//! Non-overlapping max pooling (kernel == stride) and its gradient.
//!
//! The forward pass follows candle exactly: the output size rounds down
//! (trailing rows/columns that do not fill a window are ignored) and the
//! maximum is found with `largest < v` in row-major window order, so a NaN in
//! the first position wins and later NaNs are skipped.
//!
//! The backward pass is the true derivative, as in PyTorch: each window's
//! gradient goes, whole, to the first position holding its maximum. candle
//! 0.11.1's own max-pool gradient is not: it multiplies by the fraction of the
//! window equal to the maximum, so a unique maximum of a 2×2 window receives a
//! quarter of its gradient (see `max_pool2d_gradient_is_the_true_derivative`
//! in the tests).

use rayon::prelude::*;

use crate::OpsError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolGeometry {
    /// `n · c`: pooling treats every channel of every sample alike.
    pub planes: usize,
    pub height: usize,
    pub width: usize,
    pub size: usize,
    pub out_h: usize,
    pub out_w: usize,
}

impl PoolGeometry {
    pub fn new(x_dims: &[usize], size: usize) -> Result<Self, OpsError> {
        let &[n, c, height, width] = x_dims else {
            return Err(OpsError::Shape(format!(
                "max_pool2d input must be [n, c, h, w], got {x_dims:?}"
            )));
        };
        if size == 0 {
            return Err(OpsError::Shape("max_pool2d size must be at least 1".into()));
        }
        if size > height || size > width {
            return Err(OpsError::Shape(format!(
                "max_pool2d window {size}x{size} is larger than the input {height}x{width}"
            )));
        }
        Ok(Self {
            planes: n * c,
            height,
            width,
            size,
            out_h: height / size,
            out_w: width / size,
        })
    }

    pub fn output_dims(&self, x_dims: &[usize]) -> Vec<usize> {
        vec![x_dims[0], x_dims[1], self.out_h, self.out_w]
    }

    fn plane_in(&self) -> usize {
        self.height * self.width
    }
    fn plane_out(&self) -> usize {
        self.out_h * self.out_w
    }
}

fn check_len(what: &str, data: &[f32], expected: usize) -> Result<(), OpsError> {
    if data.len() == expected {
        Ok(())
    } else {
        Err(OpsError::Internal(format!(
            "max_pool2d {what} holds {} values, its shape needs {expected}",
            data.len()
        )))
    }
}

/// Planes per parallel task: enough work to amortise rayon's scheduling.
fn planes_per_task(g: &PoolGeometry) -> usize {
    (16 * 1024 / g.plane_in().max(1)).max(1)
}

pub(crate) fn forward(g: &PoolGeometry, x: &[f32]) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.planes * g.plane_in())?;
    let mut y = vec![0.0f32; g.planes * g.plane_out()];
    if y.is_empty() {
        return Ok(y);
    }
    let per_task = planes_per_task(g);
    let (s, w) = (g.size, g.width);
    y.par_chunks_mut(per_task * g.plane_out())
        .zip(x.par_chunks(per_task * g.plane_in()))
        .for_each(|(y_task, x_task)| {
            for (yp, xp) in y_task
                .chunks_exact_mut(g.plane_out())
                .zip(x_task.chunks_exact(g.plane_in()))
            {
                for oh in 0..g.out_h {
                    for ow in 0..g.out_w {
                        let base = oh * s * w + ow * s;
                        let mut largest = xp[base];
                        for m in 0..s {
                            for v in &xp[base + m * w..base + m * w + s] {
                                if largest < *v {
                                    largest = *v;
                                }
                            }
                        }
                        yp[oh * g.out_w + ow] = largest;
                    }
                }
            }
        });
    Ok(y)
}

/// `dx` from the input `x`, the pooled output `y` and its gradient `dy`.
pub(crate) fn backward(
    g: &PoolGeometry,
    x: &[f32],
    y: &[f32],
    dy: &[f32],
) -> Result<Vec<f32>, OpsError> {
    check_len("input", x, g.planes * g.plane_in())?;
    check_len("output", y, g.planes * g.plane_out())?;
    check_len("output gradient", dy, g.planes * g.plane_out())?;
    let mut dx = vec![0.0f32; g.planes * g.plane_in()];
    if y.is_empty() {
        return Ok(dx);
    }
    let per_task = planes_per_task(g);
    let (s, w) = (g.size, g.width);
    dx.par_chunks_mut(per_task * g.plane_in())
        .zip(x.par_chunks(per_task * g.plane_in()))
        .zip(y.par_chunks(per_task * g.plane_out()))
        .zip(dy.par_chunks(per_task * g.plane_out()))
        .for_each(|(((dx_task, x_task), y_task), dy_task)| {
            let planes = dx_task
                .chunks_exact_mut(g.plane_in())
                .zip(x_task.chunks_exact(g.plane_in()))
                .zip(y_task.chunks_exact(g.plane_out()))
                .zip(dy_task.chunks_exact(g.plane_out()));
            for (((dxp, xp), yp), dyp) in planes {
                for oh in 0..g.out_h {
                    for ow in 0..g.out_w {
                        let base = oh * s * w + ow * s;
                        let max = yp[oh * g.out_w + ow];
                        let is_max = |v: f32| v == max || (max.is_nan() && v.is_nan());
                        let first = (0..s)
                            .flat_map(|m| (0..s).map(move |k| base + m * w + k))
                            .find(|&i| is_max(xp[i]));
                        if let Some(i) = first {
                            dxp[i] = dyp[oh * g.out_w + ow];
                        }
                    }
                }
            }
        });
    Ok(dx)
}
