//! `hidden`: layer-wise hidden-state distillation. Student layer i is matched to teacher
//! layer j (a `layers` map in the preset, or every student layer to the teacher layer at the
//! same relative depth), through a learned linear projection when the widths differ
//! (DistillKit's hidden-state mode), with a mean squared difference or 1 − cosine, at the
//! response and/or the visual positions:
//!
//!   L_hidden = Σ_k w_k · d(P_k h_s^{i_k}, h_t^{j_k}),
//!
//! with w_k = 1/K, or (`dynamic = true`) each pair's share of the current pair losses,
//! w_k = d_k / Σ d (detached), so the layers furthest from the teacher get most of the
//! gradient as training goes on. The projections P_k (d_t × d_s, no bias) are the term's own
//! parameters: they train with the student and are saved in its training state, not in the
//! exported student.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use mmkd_nn::Linear;

use super::{rows_at, width_map, TermKind};
use crate::distill::positions::gather_rows;
use crate::distill::LossInputs;
use crate::objective::{Binding, HiddenDistance, Needs, Term, TermPositions};

pub const KIND: TermKind = TermKind {
    name: "hidden",
    log_name: "l_hidden",
    about: "student‖teacher hidden states at mapped layers, projected when widths differ",
    divergence_options: false,
    options: &["layers", "distance", "positions", "dynamic"],
    build: |cfg| {
        let spec = &cfg.spec;
        Ok(Box::new(Hidden {
            map: spec
                .layers
                .as_ref()
                .map(|pairs| pairs.iter().map(|&[s, t]| (s, t)).collect()),
            distance: spec.distance.unwrap_or_default(),
            positions: spec.positions.unwrap_or_default(),
            dynamic: spec.dynamic.unwrap_or(false),
            pairs: Vec::new(),
        }))
    },
};

#[derive(Debug)]
struct Hidden {
    /// The preset's map, `None` for the uniform one.
    map: Option<Vec<(usize, usize)>>,
    distance: HiddenDistance,
    positions: TermPositions,
    dynamic: bool,
    /// Settled by `bind`.
    pairs: Vec<LayerPair>,
}

#[derive(Debug)]
struct LayerPair {
    student: usize,
    teacher: usize,
    /// Student width → teacher width; `None` when they agree.
    projection: Option<Linear>,
}

/// Every student layer i ≥ 1 to the teacher layer at the same relative depth.
fn uniform_map(student_layers: usize, teacher_layers: usize) -> Vec<(usize, usize)> {
    (1..=student_layers)
        .map(|i| {
            let j = (i * teacher_layers + student_layers / 2) / student_layers;
            (i, j.clamp(1, teacher_layers))
        })
        .collect()
}

impl Term for Hidden {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_logits: true,
            ..Needs::default()
        }
    }

    fn bind(&mut self, binding: &Binding) -> Result<()> {
        let teacher = binding
            .teacher
            .context("reads the teacher's hidden states: it needs an online teacher (--teacher)")?;
        let (ls, lt) = (binding.student.layers, teacher.layers);
        let map = self.map.clone().unwrap_or_else(|| uniform_map(ls, lt));
        ensure!(!map.is_empty(), "`layers` is empty: give at least one pair");
        let (ws, wt) = (binding.student.width, teacher.width);
        self.pairs = map
            .iter()
            .enumerate()
            .map(|(k, &(s, t))| {
                for (who, layer, count) in [("student", s, ls), ("teacher", t, lt)] {
                    if layer > count {
                        bail!(
                            "`layers` entry {k} ([{s}, {t}]) names {who} layer {layer}; the {who} \
                             has {count} layers (0 = the embeddings, 1..={count} the decoder layers)"
                        );
                    }
                }
                // Named by the pair, so a map's projections do not depend on its order.
                let projection =
                    width_map(&binding.params.pp(format!("proj_{s}_{t}")), ws, wt)?;
                Ok(LayerPair {
                    student: s,
                    teacher: t,
                    projection,
                })
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    fn layers(&self) -> (Vec<usize>, Vec<usize>) {
        self.pairs.iter().map(|p| (p.student, p.teacher)).unzip()
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        ensure!(
            !self.pairs.is_empty(),
            "objective term `hidden` was not bound to the models"
        );
        let states = inputs.layer_states(KIND.name)?;
        let rows = rows_at(inputs, self.positions);
        if rows.is_empty() {
            return Ok(None);
        }
        let losses = self
            .pairs
            .iter()
            .map(|pair| {
                let at = |layers: &std::collections::BTreeMap<usize, Tensor>, layer, who| {
                    let h = layers.get(&layer).with_context(|| {
                        format!("the {who}'s hidden state of layer {layer} was not kept")
                    })?;
                    gather_rows(&h.to_dtype(DType::F32)?, &rows)
                };
                let mut s = at(states.student, pair.student, "student")?;
                if let Some(p) = &pair.projection {
                    s = p.forward(&s)?;
                }
                let t = at(states.teacher, pair.teacher, "teacher")?.detach();
                ensure!(
                    s.dims() == t.dims(),
                    "student layer {} gives {:?} and teacher layer {} {:?}: the widths differ \
                     and no projection maps them",
                    pair.student,
                    s.dims(),
                    pair.teacher,
                    t.dims()
                );
                self.distance_of(&s, &t)
            })
            .collect::<Result<Vec<Tensor>>>()?;
        let k = losses.len() as f64;
        let weights: Vec<f64> = if self.dynamic {
            let values = losses
                .iter()
                .map(|l| Ok(f64::from(l.to_scalar::<f32>()?)))
                .collect::<Result<Vec<f64>>>()?;
            let sum: f64 = values.iter().sum();
            if sum > 0.0 && sum.is_finite() {
                values.iter().map(|v| v / sum).collect()
            } else {
                vec![1.0 / k; losses.len()]
            }
        } else {
            vec![1.0 / k; losses.len()]
        };
        let mut total: Option<Tensor> = None;
        for (l, w) in losses.iter().zip(weights) {
            let term = l.affine(w, 0.0)?;
            total = Some(match total {
                Some(t) => t.add(&term)?,
                None => term,
            });
        }
        Ok(total)
    }
}

impl Hidden {
    /// d(s, t) over `[rows, width]`: mean squared difference, or mean (1 − cosine).
    fn distance_of(&self, s: &Tensor, t: &Tensor) -> Result<Tensor> {
        Ok(match self.distance {
            HiddenDistance::Mse => s.sub(t)?.sqr()?.mean_all()?,
            HiddenDistance::Cosine => {
                let dot = s.mul(t)?.sum(D::Minus1)?;
                let norms = s
                    .sqr()?
                    .sum(D::Minus1)?
                    .mul(&t.sqr()?.sum(D::Minus1)?)?
                    .sqrt()?
                    .clamp(1e-12, f64::INFINITY)?;
                dot.div(&norms)?.affine(-1.0, 1.0)?.mean_all()?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{LayerPair as States, StudentLogits, TeacherSide};
    use crate::objective::{LmShape, Objective, TermSpec};
    use candle_core::{Device, Var};
    use mmkd_nn::{ParamBuilder, ParamStore};
    use std::collections::BTreeMap;

    fn text(width: usize, layers: usize) -> LmShape {
        LmShape { layers, width }
    }

    fn objective(spec: &str) -> Result<(Objective, ParamStore)> {
        let spec: TermSpec = toml::from_str(spec).unwrap();
        let mut objective = Objective::new(&[spec], &Default::default())?;
        let store = ParamStore::new();
        objective.bind(&Binding {
            student: text(2, 2),
            teacher: Some(text(3, 4)),
            params: ParamBuilder::fresh(&store, 7, &Device::Cpu).pp("objective"),
            shared_vocab: None,
        })?;
        Ok((objective, store))
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Hidden states `[1, 3, width]` with distinct values.
    fn state(width: usize, seed: f32) -> Tensor {
        let v: Vec<f32> = (0..3 * width)
            .map(|i| ((i as f32 + seed) * 0.7).sin())
            .collect();
        Tensor::from_vec(v, (1, 3, width), &Device::Cpu).unwrap()
    }

    /// The objective on a batch of one sample of 3 positions (vocabulary 4, zero logits) with
    /// these labels, image mask and hidden states.
    fn evaluate(
        objective: &Objective,
        student: &BTreeMap<usize, Tensor>,
        teacher: &BTreeMap<usize, Tensor>,
        labels: [i64; 3],
        mask: [u8; 3],
    ) -> crate::objective::ObjectiveValue {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[labels], &dev).unwrap();
        let mask = Tensor::new(&[mask], &dev).unwrap();
        let inputs = LossInputs::new(
            StudentLogits::Full(&logits),
            &labels,
            &mask,
            Some(TeacherSide::Logits {
                logits: &logits,
                relation_hidden: None,
            }),
            None,
        )
        .unwrap()
        .with_layers(States { student, teacher });
        objective.evaluate(&inputs).unwrap()
    }

    #[test]
    fn projected_mse_at_both_positions_with_gradients_to_student_and_projection() {
        let (objective, store) =
            objective("term = \"hidden\"\nlayers = [[1, 2], [2, 4]]\npositions = \"both\"")
                .unwrap();
        assert_eq!(objective.layers(), (vec![1, 2], vec![2, 4]));
        let student: BTreeMap<usize, Var> = [(1, state(2, 0.0)), (2, state(2, 5.0))]
            .into_iter()
            .map(|(i, t)| (i, Var::from_tensor(&t).unwrap()))
            .collect();
        let student_states: BTreeMap<usize, Tensor> = student
            .iter()
            .map(|(&i, v)| (i, v.as_tensor().clone()))
            .collect();
        let teacher: BTreeMap<usize, Tensor> = [(2, state(3, 9.0)), (4, state(3, 13.0))]
            .into_iter()
            .collect();
        // Position 1 predicts the response token; position 0 is the image.
        let value = evaluate(
            &objective,
            &student_states,
            &teacher,
            [-100, -100, 2],
            [1, 0, 0],
        );

        // Written out: rows 1 (response) then 0 (visual); s·Pᵀ against t, mean over 2×3.
        let mut expected = 0.0f64;
        for (ls, lt) in [(1usize, 2usize), (2, 4)] {
            let p = values(
                &store
                    .get(&format!("objective.l_hidden.proj_{ls}_{lt}.weight"))
                    .unwrap()
                    .tensor,
            );
            let (s, t) = (values(&student_states[&ls]), values(&teacher[&lt]));
            let mut sum = 0.0f64;
            for row in [1usize, 0] {
                for o in 0..3 {
                    let projected: f32 = (0..2).map(|i| p[o * 2 + i] * s[row * 2 + i]).sum();
                    sum += f64::from(projected - t[row * 3 + o]).powi(2);
                }
            }
            expected += sum / 6.0 / 2.0;
        }
        assert!(
            (f64::from(value.total_value) - expected).abs() < 1e-5,
            "{} vs {expected}",
            value.total_value
        );
        let grads = value.total.backward().unwrap();
        for (name, var) in store.trainable_vars() {
            assert!(
                grads.get(var.as_tensor()).is_some(),
                "{name} has no gradient"
            );
        }
        for var in student.values() {
            assert!(grads.get(var.as_tensor()).is_some());
        }
    }

    #[test]
    fn dynamic_weights_follow_each_pairs_share_of_the_loss() {
        let run = |spec: &str| -> f32 {
            let (objective, _) = objective(spec).unwrap();
            let student: BTreeMap<usize, Tensor> = [(1, state(2, 0.0)), (2, state(2, 5.0))]
                .into_iter()
                .collect();
            let teacher: BTreeMap<usize, Tensor> = [(2, state(3, 9.0)), (4, state(3, 13.0))]
                .into_iter()
                .collect();
            evaluate(&objective, &student, &teacher, [-100, 1, 2], [0, 0, 0]).total_value
        };
        let base = "term = \"hidden\"\nlayers = [[1, 2], [2, 4]]";
        let first = run("term = \"hidden\"\nlayers = [[1, 2]]");
        let second = run("term = \"hidden\"\nlayers = [[2, 4]]");
        let (d1, d2) = (f64::from(first), f64::from(second));
        let equal = run(base);
        let dynamic = run(&format!("{base}\ndynamic = true"));
        assert!((f64::from(equal) - (d1 + d2) / 2.0).abs() < 1e-5);
        let want = (d1 * d1 + d2 * d2) / (d1 + d2);
        assert!(
            (f64::from(dynamic) - want).abs() < 1e-5,
            "{dynamic} vs {want}"
        );
    }

    #[test]
    fn bad_maps_and_missing_teachers_are_named() {
        let err = objective("term = \"hidden\"\nlayers = [[1, 2], [3, 4]]").unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "objective term `hidden`: `layers` entry 1 ([3, 4]) names student layer 3; the \
             student has 2 layers (0 = the embeddings, 1..=2 the decoder layers)"
        );
        let err = objective("term = \"hidden\"\nlayers = [[1, 5]]").unwrap_err();
        assert!(format!("{err:#}").contains("names teacher layer 5; the teacher has 4"));
        let err = objective("term = \"hidden\"\ndivergence = \"jsd\"").unwrap_err();
        assert!(
            format!("{err:#}").contains("takes no `divergence` (its options: term, weight, name, layers, distance, positions, dynamic)"),
            "{err:#}"
        );
        let spec: TermSpec = toml::from_str("term = \"hidden\"").unwrap();
        let mut alone = Objective::new(&[spec], &Default::default()).unwrap();
        let store = ParamStore::new();
        let err = alone
            .bind(&Binding {
                student: text(2, 2),
                teacher: None,
                params: ParamBuilder::fresh(&store, 0, &Device::Cpu),
                shared_vocab: None,
            })
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("needs an online teacher"),
            "{err:#}"
        );
    }

    #[test]
    fn cosine_of_parallel_states_is_zero_and_the_uniform_map_is_the_default() {
        let dev = Device::Cpu;
        let spec: TermSpec = toml::from_str("term = \"hidden\"\ndistance = \"cosine\"").unwrap();
        let mut objective = Objective::new(&[spec], &Default::default()).unwrap();
        let store = ParamStore::new();
        objective
            .bind(&Binding {
                student: text(3, 2),
                teacher: Some(text(3, 4)),
                params: ParamBuilder::fresh(&store, 0, &dev),
                shared_vocab: None,
            })
            .unwrap();
        // Same widths: no projection; the uniform map pairs 1 → 2 and 2 → 4.
        assert!(store.is_empty());
        assert_eq!(objective.layers(), (vec![1, 2], vec![2, 4]));
        let student: BTreeMap<usize, Tensor> = [(1, state(3, 1.0)), (2, state(3, 2.0))]
            .into_iter()
            .collect();
        let teacher: BTreeMap<usize, Tensor> = [
            (2, state(3, 1.0).affine(3.0, 0.0).unwrap()),
            (4, state(3, 2.0).affine(0.5, 0.0).unwrap()),
        ]
        .into_iter()
        .collect();
        let v = evaluate(&objective, &student, &teacher, [-100, 1, 2], [0, 0, 0]).total_value;
        assert!(v.abs() < 1e-6, "{v}");
    }

    #[test]
    fn the_uniform_map_spreads_student_layers_over_the_teachers() {
        assert_eq!(uniform_map(2, 4), [(1, 2), (2, 4)]);
        assert_eq!(uniform_map(3, 4), [(1, 1), (2, 3), (3, 4)]);
        assert_eq!(uniform_map(4, 4), [(1, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(uniform_map(4, 2), [(1, 1), (2, 1), (3, 2), (4, 2)]);
    }
}
