//! Analytic FLOP count of one distillation step: matrix products only, 2·m·n·k each.
//!
//! Element-wise work (norms, activations, softmax, the optimizer) is not counted, so GFLOP/s
//! is comparable with a matmul peak. Per model, for batch B, sequence S, T image tokens per
//! sample (one image each), vocabulary V:
//!
//! ```text
//! vision (layers up to the selected one, Lv):
//!   patchify 2·B·T·(3p²)·Hv + Lv·[ 8·B·T·Hv² (q,k,v,o) + 4·B·T²·Hv (QKᵀ, PV) + 4·B·T·Hv·Iv (MLP) ]
//! projector: 2·B·T·Hv·H + 2·B·T·H·H
//! decoder (L layers, n heads, g kv heads, head width d):
//!   L·[ 2·B·S·H·(2nd + 2gd) (q,k,v,o) + 4·B·n·S²·d (QKᵀ, PV over the full S×S) + 6·B·S·H·I (MLP) ]
//! lm_head: 2·B·S·H·V
//! RDist Gram matrices (both models): 2·B·T²·V each
//! ```
//!
//! Backward (student only; the vision tower is frozen and detached): every product on the
//! path costs twice its forward (gradient of each operand), except the projector's first
//! layer, whose input is a constant (weight gradient only, 1×). The RDist Gram term is counted
//! as the peer computes it (from logits), whatever formulation mmkd uses.

use serde::Serialize;

use super::spec::{BenchSpec, LmSpec};

/// FLOPs of one step, split like the timings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepFlops {
    pub teacher_forward: f64,
    pub student_forward: f64,
    /// The two RDist Gram matrices.
    pub loss: f64,
    pub backward: f64,
}

impl StepFlops {
    pub fn of(spec: &BenchSpec) -> Self {
        let teacher = ModelFlops::of(spec, &spec.teacher);
        let student = ModelFlops::of(spec, &spec.student);
        let (b, t, v) = (
            spec.batch as f64,
            spec.image_tokens() as f64,
            spec.vocab as f64,
        );
        let gram = 2.0 * b * t * t * v;
        let backward = 2.0 * (student.decoder + student.lm_head + student.projector_2 + gram)
            + student.projector_1;
        Self {
            teacher_forward: teacher.forward(),
            student_forward: student.forward(),
            loss: 2.0 * gram,
            backward,
        }
    }

    pub fn total(&self) -> f64 {
        self.teacher_forward + self.student_forward + self.loss + self.backward
    }
}

/// Forward FLOPs of one LLaVA model, by module.
struct ModelFlops {
    vision: f64,
    projector_1: f64,
    projector_2: f64,
    decoder: f64,
    lm_head: f64,
}

impl ModelFlops {
    fn of(spec: &BenchSpec, lm: &LmSpec) -> Self {
        let f = |x: usize| x as f64;
        let (b, s, t) = (f(spec.batch), f(spec.seq_len()), f(spec.image_tokens()));
        let v = &spec.vision;
        let (hv, iv, p) = (f(v.hidden), f(v.intermediate), f(v.patch));
        let vision_layer = 8.0 * b * t * hv * hv + 4.0 * b * t * t * hv + 4.0 * b * t * hv * iv;
        let vision = 2.0 * b * t * 3.0 * p * p * hv + f(spec.vision_layers_needed()) * vision_layer;
        let (h, i, d) = (f(lm.hidden), f(lm.intermediate), f(lm.head_dim()));
        let (n, g) = (f(lm.heads), f(lm.kv_heads));
        let decoder_layer = 2.0 * b * s * h * (2.0 * n * d + 2.0 * g * d)
            + 4.0 * b * n * s * s * d
            + 6.0 * b * s * h * i;
        Self {
            vision,
            projector_1: 2.0 * b * t * hv * h,
            projector_2: 2.0 * b * t * h * h,
            decoder: f(lm.layers) * decoder_layer,
            lm_head: 2.0 * b * s * h * f(spec.vocab),
        }
    }

    fn forward(&self) -> f64 {
        self.vision + self.projector_1 + self.projector_2 + self.decoder + self.lm_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::spec::VisionSpec;

    /// A spec small enough to count by hand.
    fn hand_spec() -> BenchSpec {
        BenchSpec {
            vocab: 10,
            batch: 1,
            prefix_tokens: 1,
            prompt_tokens: 0,
            response_tokens: 1,
            vision: VisionSpec {
                image_size: 2,
                patch: 1,
                hidden: 2,
                intermediate: 3,
                layers: 2,
                heads: 1,
            },
            student: LmSpec {
                hidden: 4,
                intermediate: 5,
                layers: 1,
                heads: 2,
                kv_heads: 1,
            },
            teacher: LmSpec {
                hidden: 4,
                intermediate: 5,
                layers: 1,
                heads: 2,
                kv_heads: 1,
            },
        }
    }

    #[test]
    fn counts_match_a_hand_count() {
        let spec = hand_spec();
        // T = 4 image tokens, S = 6, one vision layer needed.
        // vision: patchify 2·4·3·2 = 48; layer: q,k,v,o 4·(2·4·2·2) = 128, QKᵀ+PV 2·(2·4·4·2) = 128,
        //         MLP 2·(2·4·2·3) = 96 → 400 in all.
        // projector: 2·4·2·4 = 64 and 2·4·4·4 = 128.
        // decoder (d = 2): q 2·6·4·4 = 192, k,v 2·(2·6·4·2) = 192, o 192,
        //         QKᵀ+PV 2·(2·2·6·6·2) = 576, MLP 3·(2·6·4·5) = 720 → 1872.
        // lm_head: 2·6·4·10 = 480.
        let forward = 400.0 + 64.0 + 128.0 + 1872.0 + 480.0;
        let gram = 2.0 * 4.0 * 4.0 * 10.0;
        let flops = StepFlops::of(&spec);
        assert_eq!(flops.teacher_forward, forward);
        assert_eq!(flops.student_forward, forward);
        assert_eq!(flops.loss, 2.0 * gram);
        assert_eq!(flops.backward, 2.0 * (1872.0 + 480.0 + 128.0 + gram) + 64.0);
        assert_eq!(flops.total(), 2.0 * forward + 2.0 * gram + flops.backward);
    }
}
