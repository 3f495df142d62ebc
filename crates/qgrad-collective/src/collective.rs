//! The collectives a data-parallel step needs, behind one trait, and the
//! start-up check that every rank runs the same configuration.

use crate::error::{CollectiveError, Result};

/// Bytes this rank passed to collectives as its contribution (the send
/// buffers), counted at the calls. What the network carries depends on the
/// algorithm the library picks: a ring all-gather of `b` bytes per rank
/// sends `(N−1)·b` per rank, a ring all-reduce of `b` bytes `2(N−1)/N · b`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Collective calls.
    pub calls: u64,
    /// Bytes passed as this rank's send buffer, summed over the calls.
    pub bytes_sent: u64,
}

/// A group of `size` ranks that exchange buffers. Every rank must make the
/// same calls in the same order with buffers of the same length; a wait for
/// the other ranks is bounded and ends in [`CollectiveError::Timeout`] (or,
/// where the engine can tell, [`CollectiveError::PeerLost`]).
pub trait Collective {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `send` (all of the same length), concatenated in rank
    /// order, into `recv` (resized).
    fn all_gather(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()>;
    /// The element-wise sum of every rank's `buf`, in place.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// What this rank has sent so far.
    fn traffic(&self) -> Traffic;
    /// The engine, in words (`"MPI: Open MPI v4.1.4"`, `"threads"`).
    fn engine(&self) -> String;
}

/// The one-rank group: every collective is the identity (a single process
/// trains as before, nothing is sent).
#[derive(Debug, Default)]
pub struct Solo {
    traffic: Traffic,
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_gather(&mut self, send: &[u8], recv: &mut Vec<u8>) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += send.len() as u64;
        recv.clear();
        recv.extend_from_slice(send);
        Ok(())
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.traffic.calls += 1;
        self.traffic.bytes_sent += 4 * buf.len() as u64;
        Ok(())
    }
    fn traffic(&self) -> Traffic {
        self.traffic
    }
    fn engine(&self) -> String {
        "one process".into()
    }
}

/// Checks that every rank was started with the same `description` (the
/// settings that must agree, in words); the same error on every rank
/// otherwise, naming the ranks that differ and their settings.
pub fn agree(group: &mut dyn Collective, description: &str) -> Result<()> {
    let n = group.size();
    let mine = description.as_bytes();
    let mut recv = Vec::new();
    group.all_gather(&(mine.len() as u64).to_le_bytes(), &mut recv)?;
    let lens: Vec<usize> = recv
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let width = lens.iter().copied().max().unwrap_or(0);
    let mut padded = mine.to_vec();
    padded.resize(width, 0);
    group.all_gather(&padded, &mut recv)?;
    let rank = group.rank();
    let mut others = Vec::new();
    for r in 0..n {
        let theirs = &recv[r * width..r * width + lens[r]];
        if theirs != mine {
            others.push((r, String::from_utf8_lossy(theirs).into_owned()));
        }
    }
    if others.is_empty() {
        Ok(())
    } else {
        Err(CollectiveError::ConfigMismatch {
            rank,
            mine: description.to_string(),
            others,
        })
    }
}

/// Sets `buf` to the element-wise sum of `parts` (each `4·buf.len()` bytes
/// of little-endian f32, one per rank) in rank order, starting from rank 0's
/// values (not from 0.0, whose sum with −0.0 would lose the sign): with two
/// ranks this is the single addition any MPI implementation does.
pub(crate) fn sum_in_rank_order<'a>(mut parts: impl Iterator<Item = &'a [u8]>, buf: &mut [f32]) {
    let value =
        |part: &[u8], i: usize| f32::from_le_bytes(part[4 * i..4 * i + 4].try_into().unwrap());
    if let Some(first) = parts.next() {
        for (i, v) in buf.iter_mut().enumerate() {
            *v = value(first, i);
        }
    }
    for part in parts {
        for (i, v) in buf.iter_mut().enumerate() {
            *v += value(part, i);
        }
    }
}

/// The element-wise mean of every rank's `values`, in place: an all-gather
/// summed in rank order, so it is the same bits on every engine and any
/// number of ranks (unlike an MPI all-reduce, whose order is the library's).
pub fn mean_in_rank_order(group: &mut dyn Collective, values: &mut [f32]) -> Result<()> {
    let send: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut recv = Vec::new();
    group.all_gather(&send, &mut recv)?;
    sum_in_rank_order(recv.chunks_exact(send.len().max(1)), values);
    let n = group.size() as f32;
    for v in values.iter_mut() {
        *v /= n;
    }
    Ok(())
}
