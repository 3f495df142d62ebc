//! Pareto extraction (METHOD §9): a design is optimal when no other design
//! has both lower-or-equal memory and lower-or-equal error, one of them
//! strictly.

use serde::Serialize;

use crate::{DesignError, Result};

/// One design: its memory (any unit, the same for all) and its test error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// Memory (bits or bytes).
    pub memory: f64,
    /// Test error (a fraction or percent).
    pub error: f64,
}

impl Point {
    /// A point.
    pub fn new(memory: f64, error: f64) -> Self {
        Point { memory, error }
    }
}

/// The indices of the Pareto-optimal points, by increasing memory (equal
/// points are all optimal unless another dominates them; they are listed by
/// index). `O(n log n)`.
pub fn pareto_front(points: &[Point]) -> Result<Vec<usize>> {
    for (index, p) in points.iter().enumerate() {
        if !p.memory.is_finite() || !p.error.is_finite() || p.memory < 0.0 {
            return Err(DesignError::InvalidPoint {
                index,
                memory: p.memory,
                error: p.error,
            });
        }
    }
    let mut order: Vec<usize> = (0..points.len()).collect();
    // By memory, then error, then index: a point is dominated exactly when an
    // earlier point (not equal to it) has error <= its error.
    order.sort_by(|&a, &b| {
        let (p, q) = (points[a], points[b]);
        p.memory
            .total_cmp(&q.memory)
            .then(p.error.total_cmp(&q.error))
            .then(a.cmp(&b))
    });
    let mut front = Vec::new();
    let mut best: Option<Point> = None; // the lowest error seen so far, and its memory
    for i in order {
        let p = points[i];
        let dominated = match best {
            None => false,
            // An earlier point with error below, or equal error and less
            // memory, dominates; an identical point does not.
            Some(b) => b.error < p.error || (b.error == p.error && b.memory < p.memory),
        };
        if !dominated {
            front.push(i);
        }
        if best.is_none_or(|b| p.error < b.error) {
            best = Some(p);
        }
    }
    Ok(front)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_hand_made_set() {
        // memory, error
        let pts = [
            Point::new(100.0, 0.010), // 0: optimal (lowest error)
            Point::new(10.0, 0.050),  // 1: optimal (least memory)
            Point::new(50.0, 0.020),  // 2: optimal
            Point::new(60.0, 0.020),  // 3: dominated by 2 (same error, more memory)
            Point::new(50.0, 0.030),  // 4: dominated by 2 (same memory, more error)
            Point::new(200.0, 0.015), // 5: dominated by 0
            Point::new(50.0, 0.020),  // 6: equal to 2: optimal too
            Point::new(30.0, 0.040),  // 7: optimal
        ];
        assert_eq!(pareto_front(&pts).unwrap(), vec![1, 7, 2, 6, 0]);
        assert!(pareto_front(&[]).unwrap().is_empty());
        assert!(matches!(
            pareto_front(&[Point::new(1.0, f64::NAN)]),
            Err(DesignError::InvalidPoint { index: 0, .. })
        ));
        assert!(pareto_front(&[Point::new(-1.0, 0.1)]).is_err());
    }

    proptest! {
        /// The definition, checked pairwise against the fast extraction.
        #[test]
        fn equals_the_definition(pts in prop::collection::vec((0u8..20, 0u8..20), 0..40)) {
            let pts: Vec<Point> = pts.iter().map(|&(m, e)| Point::new(m.into(), e.into())).collect();
            let front = pareto_front(&pts).unwrap();
            for (i, p) in pts.iter().enumerate() {
                let dominated = pts.iter().any(|q| {
                    q.memory <= p.memory && q.error <= p.error
                        && (q.memory < p.memory || q.error < p.error)
                });
                prop_assert_eq!(front.contains(&i), !dominated, "point {}", i);
            }
            prop_assert!(front.windows(2).all(|w| pts[w[0]].memory <= pts[w[1]].memory));
        }
    }
}
