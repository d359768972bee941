//! Picking the node for an autocommit read: least outstanding requests,
//! scaled by weight (weight 0 never reads), ties broken round-robin.

/// A node that could serve the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub index: usize,
    pub outstanding: usize,
    pub weight: u32,
}

/// Chooses among candidates; `rotation` spreads ties (pass a counter that
/// increases per call). None when no candidate has a weight above 0.
pub fn least_outstanding(candidates: &[Candidate], rotation: usize) -> Option<usize> {
    let n = candidates.len();
    if n == 0 {
        return None;
    }
    let start = rotation % n;
    least_outstanding_of(
        candidates[start..]
            .iter()
            .chain(&candidates[..start])
            .copied(),
    )
}

/// The same over candidates in tie-breaking order, without allocating.
pub fn least_outstanding_of(candidates: impl Iterator<Item = Candidate>) -> Option<usize> {
    let mut best: Option<(u64, u64, usize)> = None; // (outstanding+1, weight, index)
    for c in candidates {
        if c.weight == 0 {
            continue;
        }
        let load = c.outstanding as u64 + 1;
        let w = c.weight as u64;
        // Compare load_a / w_a < load_b / w_b without division.
        let better = match best {
            None => true,
            Some((bl, bw, _)) => load * bw < bl * w,
        };
        if better {
            best = Some((load, w, c.index));
        }
    }
    best.map(|(_, _, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: usize, outstanding: usize, weight: u32) -> Candidate {
        Candidate {
            index,
            outstanding,
            weight,
        }
    }

    #[test]
    fn picks_the_least_loaded() {
        let cs = [c(1, 3, 1), c(2, 1, 1), c(3, 2, 1)];
        assert_eq!(least_outstanding(&cs, 0), Some(2));
    }

    #[test]
    fn weight_zero_never_reads() {
        let cs = [c(1, 0, 0), c(2, 5, 1)];
        for r in 0..4 {
            assert_eq!(least_outstanding(&cs, r), Some(2));
        }
        assert_eq!(least_outstanding(&[c(1, 0, 0)], 0), None);
        assert_eq!(least_outstanding(&[], 0), None);
    }

    #[test]
    fn weights_scale_the_load() {
        // 4 outstanding at weight 4 is lighter than 1 at weight 1.
        let cs = [c(1, 1, 1), c(2, 4, 4)];
        assert_eq!(least_outstanding(&cs, 0), Some(2));
    }

    #[test]
    fn ties_rotate() {
        let cs = [c(1, 0, 1), c(2, 0, 1), c(3, 0, 1)];
        let picks: Vec<_> = (0..3).map(|r| least_outstanding(&cs, r).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 3]);
    }
}
