//! DBiLD, the Dynamic Bi-directional Logits Difference loss of Switch-KD (Sun et al., CVPR
//! Findings 2026, arXiv 2604.14629), built on BiLD (Li et al., COLING 2025, arXiv 2406.13555).
//!
//! Per row (one position), with z_t the teacher's and z_s the student's logits at temperature T:
//!
//! 1. **Adaptive top-k** (Switch-KD): the leader's logits are sorted, largest first, and k is the
//!    knee of that curve by the Kneedle rule (Satopää et al. 2011) over its first `max_k`
//!    values: normalised to x_i = i/(n−1), y_i = (v_i − v_min)/(v_max − v_min), the knee is the
//!    point farthest below the chord from the first to the last point, i* = argmax (1 − x_i) − y_i,
//!    and k = i* + 1 (the head up to and including the knee). k is kept ≥ 3: two tokens give a
//!    single difference, whose softmax is 1 whatever the logits. A flat window has no knee; k is
//!    then the whole window.
//! 2. **Logit differences** (BiLD, "logits differences"): for the leader's top-k ids i_1..i_k in its own rank
//!    order, the k(k−1)/2 differences d_{ab} = z[i_a] − z[i_b] (a < b), for teacher and student at
//!    the same ids, each softmaxed (divided by T first): p_ld from the teacher, q_ld from the
//!    student.
//! 3. **Both directions** (BiLD's L_BiLD = L_t-LD + L_s-LD): the teacher leads (its top-k ids,
//!    t-LD) and the student leads (its own top-k ids, s-LD).
//! 4. **Reverse KL** (Switch-KD): each direction is KL(q_ld ‖ p_ld), not BiLD's forward KL.
//!
//! Switch-KD's own equations were not reachable here (only its abstract and project page: "the
//! Kneedle algorithm", "teacher-guided and student-guided", "reverse KL divergence"); steps 1
//! and 4 follow those words, steps 2 and 3 BiLD's definitions, and k ≥ 3 is mmkd's choice.
//!
//! The top-k ids and k are chosen on detached values (a selection has no gradient); the loss
//! is differentiable in the student's logits through the gathered differences. Ties in the
//! sort go to the smaller token id, so the result is deterministic.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use super::logprob::log_softmax;

/// Default window the knee is searched in (`dbild` without a `max_k`).
pub const DEFAULT_DBILD_MAX_K: usize = 16;
/// The smallest k that gives more than one logit difference.
const MIN_K: usize = 3;
/// Added to the padding pairs of rows with fewer differences than the widest row: far below
/// any scaled logit difference, so their softmax weight is exactly 0.
const PAD: f64 = -1e9;

/// The Kneedle knee of `sorted` (largest first) as a count: how many leading values form the
/// head, in `[min(3, n), n]`.
pub fn knee_k(sorted: &[f64]) -> usize {
    let n = sorted.len();
    if n <= MIN_K {
        return n;
    }
    let (first, last) = (sorted[0], sorted[n - 1]);
    let range = first - last;
    if range.is_nan() || range <= 0.0 {
        // Flat: every value is as informative as the next.
        return n;
    }
    let mut best = (0, f64::NEG_INFINITY);
    for (i, &v) in sorted.iter().enumerate() {
        let x = i as f64 / (n - 1) as f64;
        let y = (v - last) / range;
        let below_chord = (1.0 - x) - y;
        // The first maximum wins ties.
        if below_chord > best.1 {
            best = (i, below_chord);
        }
    }
    (best.0 + 1).clamp(MIN_K, n)
}

/// The ids of `row`'s knee-chosen top-k, in rank order (ties to the smaller id).
pub fn leading_ids(row: &[f32], max_k: usize) -> Vec<u32> {
    let window = max_k.min(row.len());
    let by_rank = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    if window < ids.len() && window > 0 {
        ids.select_nth_unstable_by(window - 1, by_rank);
        ids.truncate(window);
    }
    ids.sort_by(by_rank);
    let sorted: Vec<f64> = ids.iter().map(|&i| f64::from(row[i as usize])).collect();
    ids.truncate(knee_k(&sorted));
    ids
}

/// The pairs (a, b), a ranked above b, of every row's leading ids: `[rows, pairs]` id tensors
/// and the 0/1 mask of real (not padding) pairs. `None` when no row has a pair.
fn pair_tensors(leaders: &[Vec<u32>], like: &Tensor) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let pairs = |k: usize| k * k.saturating_sub(1) / 2;
    let width = leaders
        .iter()
        .map(|ids| pairs(ids.len()))
        .max()
        .unwrap_or(0);
    if width == 0 {
        return Ok(None);
    }
    let rows = leaders.len();
    let (mut upper, mut lower) = (vec![0u32; rows * width], vec![0u32; rows * width]);
    let mut pad = vec![PAD; rows * width];
    for (r, ids) in leaders.iter().enumerate() {
        let mut at = r * width;
        for a in 0..ids.len() {
            for b in a + 1..ids.len() {
                upper[at] = ids[a];
                lower[at] = ids[b];
                pad[at] = 0.0;
                at += 1;
            }
        }
    }
    let device = like.device();
    Ok(Some((
        Tensor::from_vec(upper, (rows, width), device)?,
        Tensor::from_vec(lower, (rows, width), device)?,
        Tensor::from_vec(pad, (rows, width), device)?.to_dtype(like.dtype())?,
    )))
}

/// One direction: KL(q_ld ‖ p_ld) per row over the differences at `leaders`' pairs.
fn led_divergence(student: &Tensor, teacher: &Tensor, leaders: &[Vec<u32>]) -> Result<Tensor> {
    let Some((upper, lower, pad)) = pair_tensors(leaders, student)? else {
        return Ok(Tensor::zeros(
            leaders.len(),
            student.dtype(),
            student.device(),
        )?);
    };
    let differences = |z: &Tensor| -> Result<Tensor> {
        let z = z.contiguous()?;
        Ok(z.gather(&upper, 1)?.sub(&z.gather(&lower, 1)?)?.add(&pad)?)
    };
    let log_q = log_softmax(&differences(student)?)?;
    let log_p = log_softmax(&differences(teacher)?)?;
    // Padding pairs have q = 0 exactly; the mask keeps their (finite) log ratio out anyway.
    let real = pad.eq(0.0)?.to_dtype(student.dtype())?;
    Ok(log_q
        .exp()?
        .mul(&log_q.sub(&log_p)?)?
        .mul(&real)?
        .sum(D::Minus1)?)
}

/// DBiLD per row of `[rows, vocab]` logits already divided by the temperature: the teacher-led
/// plus the student-led reverse KL between the softmaxed logit differences. `teacher` is read
/// detached.
pub fn dbild_rows(student: &Tensor, teacher: &Tensor, max_k: usize) -> Result<Tensor> {
    ensure!(max_k >= 1, "dbild: `max_k` must be at least 1");
    let (_, vocab) = student.dims2()?;
    let teacher = teacher.detach();
    let host = |z: &Tensor| -> Result<Vec<f32>> {
        Ok(z.detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };
    let leaders = |values: Vec<f32>| -> Vec<Vec<u32>> {
        values
            .par_chunks(vocab.max(1))
            .map(|row| leading_ids(row, max_k))
            .collect()
    };
    let teacher_led = leaders(host(&teacher)?);
    let student_led = leaders(host(student)?);
    Ok(
        led_divergence(student, &teacher, &teacher_led)?.add(&led_divergence(
            student,
            &teacher,
            &student_led,
        )?)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use mmkd_nn::grad_check::gradients;

    #[test]
    fn the_knee_of_a_sharp_head_and_a_long_tail() {
        // Normalised: x = 0, .2, .4, .6, .8, 1; y = (v − 0.5)/9.5 = 1, .895, .158, .105, .053, 0;
        // (1 − x) − y = 0, −.095, .442, .295, .147, 0: the knee is the third value, k = 3.
        assert_eq!(knee_k(&[10.0, 9.0, 2.0, 1.5, 1.0, 0.5]), 3);
        // A later knee: 8, 8, 7.5, 7, 1, 0.5, 0 → (1 − x) − y = 0, −.167, −.271, −.375, .208,
        // .104, 0 peaks at i = 4 (k = 5).
        assert_eq!(knee_k(&[8.0, 8.0, 7.5, 7.0, 1.0, 0.5, 0.0]), 5);
        // A head of one token still gives k = 3 (two tokens make one difference, always 0).
        assert_eq!(knee_k(&[9.0, 0.2, 0.1, 0.0, 0.0]), 3);
        // Flat windows and short ones: the whole window.
        assert_eq!(knee_k(&[1.0, 1.0, 1.0, 1.0, 1.0]), 5);
        assert_eq!(knee_k(&[3.0, 1.0]), 2);
        // A straight line: every point is on the chord, the first maximum (i = 0) wins, k = 3.
        assert_eq!(knee_k(&[4.0, 3.0, 2.0, 1.0, 0.0]), 3);
    }

    #[test]
    fn leading_ids_break_ties_towards_the_smaller_id() {
        // Sorted: ids 1 (5), 3 (5), 0 (4), 4 (4), 2 (−3), 5 (−3); window 6.
        // Values 5, 5, 4, 4, −3, −3 → y = 1, 1, .875, .875, 0, 0; (1 − x) − y = 0, −.2, −.275,
        // −.475, .2, 0 → knee at i = 4, k = 5.
        let row = [4.0f32, 5.0, -3.0, 5.0, 4.0, -3.0];
        assert_eq!(leading_ids(&row, 6), [1, 3, 0, 4, 2]);
        // A window of 3 keeps the first three in rank order.
        assert_eq!(leading_ids(&row, 3), [1, 3, 0]);
    }

    /// DBiLD of one row written out: both leaders' pairs, softmax, reverse KL.
    fn by_hand(s: &[f64], t: &[f64], max_k: usize) -> f64 {
        let led = |leader: &[f64]| -> f64 {
            let row: Vec<f32> = leader.iter().map(|&v| v as f32).collect();
            let ids = leading_ids(&row, max_k);
            let mut ds = Vec::new();
            let mut dt = Vec::new();
            for a in 0..ids.len() {
                for b in a + 1..ids.len() {
                    ds.push(s[ids[a] as usize] - s[ids[b] as usize]);
                    dt.push(t[ids[a] as usize] - t[ids[b] as usize]);
                }
            }
            let softmax = |d: &[f64]| -> Vec<f64> {
                let z: f64 = d.iter().map(|v| v.exp()).sum();
                d.iter().map(|v| v.exp() / z).collect()
            };
            let (q, p) = (softmax(&ds), softmax(&dt));
            q.iter().zip(&p).map(|(q, p)| q * (q / p).ln()).sum()
        };
        led(t) + led(s)
    }

    #[test]
    fn matches_the_formula_written_out() {
        // Teacher [3, 1, 0, −2]: k = 3 → ids 0, 1, 2; differences (0−1, 0−2, 1−2) = (2, 3, 1).
        // Student [1, 2, 0.5, 0]: its own top-3 is 1, 0, 2 → differences (1−0, 1−2, 0−2).
        let t = [3.0, 1.0, 0.0, -2.0];
        let s = [1.0, 2.0, 0.5, 0.0];
        // t-LD: q = softmax(s0−s1, s0−s2, s1−s2) = softmax(−1, .5, 1.5),
        //       p = softmax(2, 3, 1); s-LD: q = softmax(1, 1.5, .5), p = softmax(−2, 1, 3).
        let lse = |v: [f64; 3]| v.iter().map(|x| x.exp()).sum::<f64>().ln();
        let rkl = |qv: [f64; 3], pv: [f64; 3]| {
            let (lq, lp) = (lse(qv), lse(pv));
            (0..3)
                .map(|i| (qv[i] - lq).exp() * ((qv[i] - lq) - (pv[i] - lp)))
                .sum::<f64>()
        };
        let expected =
            rkl([-1.0, 0.5, 1.5], [2.0, 3.0, 1.0]) + rkl([1.0, 1.5, 0.5], [-2.0, 1.0, 3.0]);
        assert!((expected - by_hand(&s, &t, 4)).abs() < 1e-12);
        let dev = Device::Cpu;
        let got = dbild_rows(
            &Tensor::new(&[s], &dev).unwrap(),
            &Tensor::new(&[t], &dev).unwrap(),
            4,
        )
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
        assert!(
            (got[0] - expected).abs() < 1e-12,
            "{} vs {expected}",
            got[0]
        );
    }

    #[test]
    fn rows_of_different_k_pad_without_changing_any_row() {
        let dev = Device::Cpu;
        let s = [
            [0.5, -1.0, 2.0, 0.1, -0.3, 1.1],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
            [4.0, -2.0, 0.0, 3.9, -1.0, 0.2],
        ];
        let t = [
            [1.5, 0.0, -1.0, 0.4, 0.3, 2.2],
            [-0.5, 2.5, 0.3, 1.0, 0.2, -3.0],
            [0.0, 0.0, 0.0, 0.0, 9.0, 1.0],
        ];
        let got = dbild_rows(
            &Tensor::new(&s, &dev).unwrap(),
            &Tensor::new(&t, &dev).unwrap(),
            6,
        )
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
        for r in 0..3 {
            let want = by_hand(&s[r], &t[r], 6);
            assert!(
                (got[r] - want).abs() < 1e-12,
                "row {r}: {} vs {want}",
                got[r]
            );
        }
        // Identical logits: 0.
        let same = Tensor::new(&t, &dev).unwrap();
        let zero = dbild_rows(&same, &same, 6)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(zero.iter().all(|v| v.abs() < 1e-12), "{zero:?}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        let student = Tensor::new(
            &[
                [0.5f64, -1.0, 2.0, 0.1, -0.3, 1.4],
                [1.0, 1.5, -0.3, 0.0, 2.2, -2.0],
            ],
            &dev,
        )
        .unwrap();
        let teacher = Tensor::new(
            &[
                [1.5f64, 0.0, -1.0, 0.4, 0.3, 3.0],
                [-0.5, 2.5, 0.3, 1.0, 0.2, 0.1],
            ],
            &dev,
        )
        .unwrap();
        let w = Tensor::new(&[0.7f64, -1.3], &dev).unwrap();
        let f = |s: &Tensor| -> candle_core::Result<Tensor> {
            dbild_rows(s, &teacher, 6)
                .map_err(candle_core::Error::wrap)?
                .mul(&w)?
                .sum_all()
        };
        // Small steps do not change any row's ranking, so the selection is fixed.
        let (analytic, numeric) = gradients(f, &student, 1e-6).unwrap();
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-7, "analytic {a} vs numeric {n}");
        }
        assert!(analytic.iter().any(|g| g.abs() > 1e-3));
    }
}
