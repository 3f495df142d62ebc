//! Ranking and selection of parameter elements by accumulated gradient.
//!
//! Works on host copies (`AccumulatedGradients::to_host`): it runs once per
//! epoch or once after training, not per step. Elements are ordered by the
//! total order (score, tensor index, element index), so equal scores resolve
//! identically on every run.

use std::cmp::Ordering;

use rayon::slice::ParallelSliceMut;

use crate::{AccumError, Result};

/// One scored element: `tensor` indexes the host list, `index` is the
/// row-major element index inside that tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankedElement {
    /// Index of the tensor in the host score list.
    pub tensor: usize,
    /// Row-major element index inside that tensor.
    pub index: usize,
    /// The element's accumulated gradient `A`.
    pub score: f32,
}

/// Over which elements a ranking or selection runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// All parameters of the network together (METHOD.md §3 default).
    #[default]
    Global,
    /// Each layer separately; a layer is every tensor sharing the name prefix
    /// before the last '.' (`fc1.weight` and `fc1.bias` form layer `fc1`).
    PerLayer,
}

/// The layer a parameter belongs to: its name without the last `.component`.
pub fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(layer, _)| layer)
}

fn order(a: &RankedElement, b: &RankedElement) -> Ordering {
    a.score
        .total_cmp(&b.score)
        .then(a.tensor.cmp(&b.tensor))
        .then(a.index.cmp(&b.index))
}

type HostScores = [crate::HostTensor];

fn check(scores: &HostScores) -> Result<()> {
    for (name, shape, values) in scores {
        if shape.iter().product::<usize>() != values.len() {
            return Err(AccumError::ShapeMismatch {
                name: name.clone(),
                expected: shape.clone(),
                got: vec![values.len()],
            });
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(AccumError::NotFinite(name.clone()));
        }
    }
    Ok(())
}

fn elements(scores: &HostScores, tensors: &[usize]) -> Vec<RankedElement> {
    let mut out = Vec::new();
    for &t in tensors {
        out.extend(
            scores[t]
                .2
                .iter()
                .enumerate()
                .map(|(index, &score)| RankedElement {
                    tensor: t,
                    index,
                    score,
                }),
        );
    }
    out
}

/// Layer groups in first-appearance order: `(layer name, tensor indices)`.
fn groups(scores: &HostScores, scope: Scope) -> Vec<(String, Vec<usize>)> {
    match scope {
        Scope::Global => vec![(String::new(), (0..scores.len()).collect())],
        Scope::PerLayer => {
            let mut out: Vec<(String, Vec<usize>)> = Vec::new();
            for (t, (name, _, _)) in scores.iter().enumerate() {
                let layer = layer_of(name);
                match out.iter_mut().find(|(l, _)| l == layer) {
                    Some((_, members)) => members.push(t),
                    None => out.push((layer.to_string(), vec![t])),
                }
            }
            out
        }
    }
}

/// Every element of every tensor, least important (lowest A) first.
pub fn rank_global(scores: &HostScores) -> Result<Vec<RankedElement>> {
    check(scores)?;
    let mut all = elements(scores, &(0..scores.len()).collect::<Vec<_>>());
    all.par_sort_unstable_by(order);
    Ok(all)
}

/// Per layer (see [`Scope::PerLayer`]): `(layer, elements lowest A first)`.
pub fn rank_per_layer(scores: &HostScores) -> Result<Vec<(String, Vec<RankedElement>)>> {
    check(scores)?;
    Ok(groups(scores, Scope::PerLayer)
        .into_iter()
        .map(|(layer, members)| {
            let mut e = elements(scores, &members);
            e.par_sort_unstable_by(order);
            (layer, e)
        })
        .collect())
}

/// Selects, within each scope group, the `round(fraction · n)` eligible
/// elements with the lowest accumulated gradient, where `n` is the number of
/// eligible elements of the group. `eligible[t][i] == false` excludes an element
/// (e.g. one already frozen); `None` makes every element eligible. Returns one
/// flag vector per tensor (`true` = selected). This is the split of METHOD.md §4.
pub fn select_lowest(
    scores: &HostScores,
    fraction: f64,
    scope: Scope,
    eligible: Option<&[Vec<bool>]>,
) -> Result<Vec<Vec<bool>>> {
    check(scores)?;
    if !(0.0..=1.0).contains(&fraction) {
        return Err(AccumError::InvalidArgument(format!(
            "selection fraction must be in [0, 1], got {fraction}"
        )));
    }
    if let Some(eligible) = eligible {
        if eligible.len() != scores.len()
            || eligible
                .iter()
                .zip(scores)
                .any(|(e, s)| e.len() != s.2.len())
        {
            return Err(AccumError::InvalidArgument(
                "eligibility flags do not match the score tensors".to_string(),
            ));
        }
    }
    let mut selected: Vec<Vec<bool>> = scores.iter().map(|s| vec![false; s.2.len()]).collect();
    for (_, members) in groups(scores, scope) {
        let mut candidates = elements(scores, &members);
        if let Some(eligible) = eligible {
            candidates.retain(|e| eligible[e.tensor][e.index]);
        }
        let k = (fraction * candidates.len() as f64).round() as usize;
        if k == 0 {
            continue;
        }
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, order);
        }
        for e in &candidates[..k] {
            selected[e.tensor][e.index] = true;
        }
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        vec![
            ("fc1.weight".into(), vec![2, 2], vec![4.0, 1.0, 3.0, 0.5]),
            ("fc1.bias".into(), vec![2], vec![2.0, 1.0]),
            ("fc2.weight".into(), vec![1, 2], vec![10.0, 0.1]),
        ]
    }

    #[test]
    fn global_ranking_is_ascending_with_stable_ties() {
        let r = rank_global(&scores()).unwrap();
        let keys: Vec<(usize, usize)> = r.iter().map(|e| (e.tensor, e.index)).collect();
        // 0.1, 0.5, 1.0 (t0), 1.0 (t1), 2.0, 3.0, 4.0, 10.0
        assert_eq!(
            keys,
            vec![
                (2, 1),
                (0, 3),
                (0, 1),
                (1, 1),
                (1, 0),
                (0, 2),
                (0, 0),
                (2, 0)
            ]
        );
    }

    #[test]
    fn per_layer_groups_weights_with_biases() {
        let r = rank_per_layer(&scores()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0, "fc1");
        assert_eq!(r[0].1.len(), 6);
        assert_eq!(r[1].0, "fc2");
        assert_eq!(r[1].1[0].score, 0.1);
    }

    #[test]
    fn select_lowest_respects_fraction_scope_and_eligibility() {
        let s = scores();
        let sel = select_lowest(&s, 0.5, Scope::Global, None).unwrap();
        // 8 elements, lowest 4: 0.1, 0.5, 1.0 (t0), 1.0 (t1)
        assert_eq!(sel[0], vec![false, true, false, true]);
        assert_eq!(sel[1], vec![false, true]);
        assert_eq!(sel[2], vec![false, true]);
        let sel = select_lowest(&s, 0.5, Scope::PerLayer, None).unwrap();
        assert_eq!(sel[0], vec![false, true, false, true]);
        assert_eq!(sel[1], vec![false, true]);
        assert_eq!(sel[2], vec![false, true]);
        // Excluding the already-selected elements picks the next ones.
        let eligible: Vec<Vec<bool>> = sel
            .iter()
            .map(|t| t.iter().map(|&x| !x).collect())
            .collect();
        let next = select_lowest(&s, 0.5, Scope::Global, Some(&eligible)).unwrap();
        assert_eq!(next[1], vec![true, false]);
        assert_eq!(next[0], vec![false, false, true, false]);
        assert!(select_lowest(&s, 1.5, Scope::Global, None).is_err());
        let mut bad = s.clone();
        bad[0].2[0] = f32::NAN;
        assert!(matches!(rank_global(&bad), Err(AccumError::NotFinite(_))));
    }
}
