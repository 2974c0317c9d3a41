//! Distillation losses against PyTorch: values and gradients from
//! `tests/fixtures/distill/make_distill_fixture.py` (float64 references from the stored f32
//! inputs; see the script for the data: 3 padded samples, one text-only, 0/1/2 images).

use std::collections::HashMap;
use std::path::PathBuf;

mod common;

use candle_core::{Tensor, Var};
use mmkd::distill::{
    cross_entropy, distill_loss, relation_loss, relation_loss_from_hidden, response_loss,
    visual_loss, visual_mask_from_ids, DistillBatch, DistillLossConfig, Divergence, RelationHidden,
};
use serde::Deserialize;

const TOL: f64 = 1e-5;

#[derive(Deserialize)]
struct Fixture {
    image_token_id: u32,
    cases: Vec<Case>,
    cross_entropy: f64,
    relation_loss: f64,
    relation_loss_hidden: f64,
    total_default: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    divergence: Divergence,
    temperature: f64,
    t2_scaling: bool,
    response_loss: f64,
    visual_loss: f64,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/distill")
}

fn load() -> (Fixture, HashMap<String, Tensor>) {
    let meta = std::fs::read_to_string(dir().join("distill.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(dir().join("distill.safetensors"), &common::test_device())
            .unwrap();
    (serde_json::from_str(&meta).unwrap(), tensors)
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= TOL * want.abs().max(1.0),
        "{what}: got {got}, PyTorch {want}"
    );
}

fn close_all(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        assert!(
            (a - b).abs() as f64 <= TOL * (b.abs() as f64).max(1.0),
            "{what}[{i}]: got {a}, PyTorch {b}"
        );
    }
}

fn value(t: &Tensor) -> f64 {
    t.to_scalar::<f32>().unwrap() as f64
}

/// The gradient of `loss(student logits)` w.r.t. the student logits.
fn grad_of(student: &Tensor, loss: impl Fn(&Tensor) -> Tensor) -> (f64, Tensor) {
    let var = Var::from_tensor(student).unwrap();
    let l = loss(var.as_tensor());
    let grads = l.backward().unwrap();
    (value(&l), grads.get(var.as_tensor()).unwrap().clone())
}

#[test]
fn every_divergence_temperature_and_t2_setting_matches_pytorch() {
    let (fx, t) = load();
    let (student, teacher) = (&t["student_logits"], &t["teacher_logits"]);
    let (labels, mask) = (&t["labels"], &t["visual_mask"]);
    let vocab = student.dim(2).unwrap();
    let flat = |x: &Tensor| x.reshape(((), vocab)).unwrap();
    assert_eq!(fx.cases.len(), 40);
    for case in &fx.cases {
        let what = format!(
            "{} ({} T={} t2={})",
            case.name, case.divergence, case.temperature, case.t2_scaling
        );
        let cfg = DistillLossConfig {
            divergence: case.divergence,
            temperature: case.temperature,
            t2_scaling: case.t2_scaling,
            ..Default::default()
        };
        let per_token = case
            .divergence
            .per_token(&flat(student), &flat(teacher), case.temperature)
            .unwrap();
        close_all(
            &per_token,
            &t[&format!("{}.per_token", case.name)],
            &format!("{what} per token"),
        );

        let (l_res, grad_res) = grad_of(student, |s| {
            response_loss(s, teacher, labels, &cfg).unwrap().unwrap()
        });
        close(l_res, case.response_loss, &format!("{what} L_res"));
        close_all(
            &grad_res,
            &t[&format!("{}.grad_res", case.name)],
            &format!("{what} ∂L_res"),
        );

        let (l_vis, grad_vis) = grad_of(student, |s| {
            visual_loss(s, teacher, mask, &cfg).unwrap().unwrap()
        });
        close(l_vis, case.visual_loss, &format!("{what} L_vis"));
        close_all(
            &grad_vis,
            &t[&format!("{}.grad_vis", case.name)],
            &format!("{what} ∂L_vis"),
        );
    }
}

#[test]
fn jsd_end_points_are_forward_and_reverse_kl() {
    let (fx, _) = load();
    let find = |d: Divergence| {
        fx.cases
            .iter()
            .find(|c| c.divergence == d && c.temperature == 1.0)
            .unwrap()
            .response_loss
    };
    assert_eq!(
        find(Divergence::GeneralizedJsd { beta: 0.0 }),
        find(Divergence::ForwardKl)
    );
    assert_eq!(
        find(Divergence::GeneralizedJsd { beta: 1.0 }),
        find(Divergence::ReverseKl)
    );
}

#[test]
fn cross_entropy_matches_pytorch() {
    let (fx, t) = load();
    let (l, grad) = grad_of(&t["student_logits"], |s| {
        cross_entropy(s, &t["labels"]).unwrap().unwrap()
    });
    close(l, fx.cross_entropy, "cross-entropy");
    close_all(&grad, &t["grad_ce"], "∂cross-entropy");
}

#[test]
fn relation_loss_matches_pytorch_from_logits_and_from_hidden_states() {
    let (fx, t) = load();
    let mask = &t["visual_mask"];
    let (l, grad) = grad_of(&t["student_logits"], |s| {
        relation_loss(s, &t["teacher_logits"], mask)
            .unwrap()
            .unwrap()
    });
    close(l, fx.relation_loss, "L_rel");
    close_all(&grad, &t["grad_rel"], "∂L_rel");

    let hidden = Var::from_tensor(&t["student_hidden"]).unwrap();
    let head = Var::from_tensor(&t["student_head"]).unwrap();
    let l = relation_loss_from_hidden(
        hidden.as_tensor(),
        head.as_tensor(),
        &t["teacher_hidden"],
        &t["teacher_head"],
        mask,
    )
    .unwrap()
    .unwrap();
    close(
        value(&l),
        fx.relation_loss_hidden,
        "L_rel from hidden states",
    );
    let grads = l.backward().unwrap();
    close_all(
        grads.get(hidden.as_tensor()).unwrap(),
        &t["grad_rel_hidden.student_hidden"],
        "∂L_rel/∂hidden",
    );
    close_all(
        grads.get(head.as_tensor()).unwrap(),
        &t["grad_rel_hidden.student_head"],
        "∂L_rel/∂lm_head",
    );
}

#[test]
fn paper_total_matches_pytorch_with_either_relation_path() {
    let (fx, t) = load();
    let ids_mask = visual_mask_from_ids(&t["input_ids"], fx.image_token_id).unwrap();
    assert_eq!(
        ids_mask.to_vec2::<u8>().unwrap(),
        t["visual_mask"].to_vec2::<u8>().unwrap()
    );
    let cfg = DistillLossConfig::default();
    let (total, grad) = grad_of(&t["student_logits"], |s| {
        let batch = DistillBatch {
            student_logits: s,
            teacher_logits: &t["teacher_logits"],
            labels: &t["labels"],
            visual_mask: &ids_mask,
            relation_hidden: None,
        };
        let terms = distill_loss(&batch, &cfg).unwrap();
        let parts = terms.ce.unwrap()
            + terms.l_res.unwrap()
            + terms.l_vis.unwrap()
            + 0.5 * terms.l_rel.unwrap();
        assert!(
            (parts - terms.total_value).abs() < 1e-5,
            "{parts} vs {}",
            terms.total_value
        );
        terms.total
    });
    close(total, fx.total_default, "total loss");
    close_all(&grad, &t["grad_total"], "∂total");
    // The hidden-state relation path gives the same total (up to the f32 rounding of the
    // stored logits).
    let batch = DistillBatch {
        student_logits: &t["student_logits"],
        teacher_logits: &t["teacher_logits"],
        labels: &t["labels"],
        visual_mask: &ids_mask,
        relation_hidden: Some(RelationHidden {
            student_hidden: &t["student_hidden"],
            student_head: &t["student_head"],
            teacher_hidden: &t["teacher_hidden"],
            teacher_head: &t["teacher_head"],
        }),
    };
    let terms = distill_loss(&batch, &cfg).unwrap();
    close(
        terms.total_value as f64,
        fx.total_default,
        "total loss, relation from hidden states",
    );
}

/// The `gkd` term, as a preset names it, against TRL's `GKDTrainer.generalized_jsd_loss`
/// (tests/fixtures/gkd, made by make_gkd_fixture.py): a padded batch with prompts of
/// different lengths, β ∈ {0, 0.5, 1}, temperatures 1 and 0.7; values and gradients in f64.
#[test]
fn the_gkd_term_matches_trls_generalized_jsd_loss() {
    use mmkd::distill::{LossInputs, StudentLogits, TeacherSide};
    use mmkd::objective::{Objective, TermSpec};
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gkd/expected.safetensors");
    let fx = candle_core::safetensors::load(path, &common::test_device()).unwrap();
    let (student, teacher, labels) = (&fx["student"], &fx["teacher"], &fx["labels"]);
    let visual_mask = labels
        .zeros_like()
        .unwrap()
        .to_dtype(candle_core::DType::U8)
        .unwrap();
    for beta in [0.0, 0.5, 1.0] {
        for temperature in [1.0, 0.7] {
            let term = TermSpec {
                beta: Some(beta),
                temperature: Some(temperature),
                ..TermSpec::new("gkd", 1.0)
            };
            let objective = Objective::new(&[term], &DistillLossConfig::default()).unwrap();
            let var = Var::from_tensor(student).unwrap();
            let side = TeacherSide::Logits {
                logits: teacher,
                relation_hidden: None,
            };
            let inputs = LossInputs::new(
                StudentLogits::Full(var.as_tensor()),
                labels,
                &visual_mask,
                Some(side),
                None,
            )
            .unwrap();
            let value = objective.evaluate(&inputs).unwrap();
            let key = format!("b{beta:?}_t{temperature:?}");
            let expected = fx[&format!("loss_{key}")].to_vec1::<f64>().unwrap()[0];
            let got = value.total.to_scalar::<f64>().unwrap();
            assert!(
                (got - expected).abs() < 1e-12,
                "{key}: {got} vs TRL {expected}"
            );
            let grads = value.total.backward().unwrap();
            let grad = grads.get(var.as_tensor()).unwrap();
            let diff = mmkd_nn::grad_check::max_abs_diff(grad, &fx[&format!("grad_{key}")]);
            assert!(diff < 1e-12, "{key}: gradient off by {diff}");
        }
    }
}

/// MiniLLM's pieces against a PyTorch implementation of the paper's formulas
/// (tests/fixtures/minillm, made by make_minillm_fixture.py): the importance weights of
/// teacher-mixed sampling, the length-normalised rewards, both loss parts and the gradient of
/// their sum, with the clip active on both sides.
#[test]
fn minillm_weights_rewards_and_losses_match_the_reference() {
    use mmkd::distill::policy::{
        importance_weights, long_term_loss, single_step_loss, token_logprobs, PolicyRows,
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/minillm/expected.safetensors");
    let fx = candle_core::safetensors::load(path, &common::test_device()).unwrap();
    let vec = |k: &str| {
        fx[k]
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let tokens: Vec<u32> = fx["tokens"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let (student, teacher) = (&fx["student"], &fx["teacher"]);
    // Weights from the sampling distributions at T = 0.9, α = 0.2.
    let q: Vec<f32> = token_logprobs(student, &tokens, 0.9)
        .unwrap()
        .iter()
        .map(|l| l.exp())
        .collect();
    let p: Vec<f32> = token_logprobs(teacher, &tokens, 0.9)
        .unwrap()
        .iter()
        .map(|l| l.exp())
        .collect();
    let weights = importance_weights(&p, &q, 0.2);
    for (w, reference) in weights.iter().zip(vec("weights")) {
        assert!(
            (w - reference).abs() < 1e-6,
            "{weights:?} vs {:?}",
            vec("weights")
        );
    }
    // Two answers of 4 and 2 tokens.
    let (old, teach) = (vec("old_logprobs"), vec("teacher_logprobs"));
    let mut policy = PolicyRows::default();
    for range in [0..4, 4..6] {
        let rows: Vec<u32> = range.clone().map(|r| r as u32).collect();
        policy
            .push_answer(
                &rows,
                &tokens[range.clone()],
                &teach[range.clone()],
                &old[range.clone()],
                &weights[range],
            )
            .unwrap();
    }
    for (a, reference) in policy.advantages.iter().zip(vec("advantages")) {
        assert!(
            (a - reference).abs() < 1e-6,
            "{:?} vs {:?}",
            policy.advantages,
            vec("advantages")
        );
    }
    let var = Var::from_tensor(student).unwrap();
    let single = single_step_loss(var.as_tensor(), teacher, &policy).unwrap();
    let long = long_term_loss(var.as_tensor(), &policy, 0.2).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f64>().unwrap();
    let reference = |k: &str| fx[k].to_vec1::<f64>().unwrap()[0];
    assert!((scalar(&single) - reference("single")).abs() < 1e-6);
    assert!((scalar(&long) - reference("long")).abs() < 1e-6);
    let grads = (single + long).unwrap().backward().unwrap();
    let diff = mmkd_nn::grad_check::max_abs_diff(grads.get(var.as_tensor()).unwrap(), &fx["grad"]);
    assert!(diff < 1e-6, "gradient off by {diff}");
}

/// The gradient of MiniLLM's combined loss (single-step + clipped long-term + CE) through a
/// tiny model (logits = X·W) against central finite differences, in f64.
#[test]
fn the_minillm_loss_gradient_matches_finite_differences_on_a_tiny_model() {
    use mmkd::distill::policy::{long_term_loss, single_step_loss, PolicyRows};
    use mmkd_nn::grad_check::gradients;
    let dev = common::test_device();
    let (rows, width, vocab) = (5, 4, 6);
    let mut rng = mmkd_nn::SeededRng::new(9);
    let x = Tensor::from_vec(rng.normal_vec(rows * width, 1.0), (rows, width), &dev)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let w0 = Tensor::from_vec(rng.normal_vec(width * vocab, 0.7), (width, vocab), &dev)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let teacher = Tensor::from_vec(rng.normal_vec(rows * vocab, 1.5), (rows, vocab), &dev)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let tokens = vec![1u32, 4, 0, 5, 2];
    // Sampler log-probabilities away from the current ones and from the clip's edges, so
    // the loss is smooth where it is differentiated.
    let current =
        mmkd::distill::policy::token_logprobs(&x.matmul(&w0).unwrap(), &tokens, 1.0).unwrap();
    let shifts = [0.5f32, -0.45, 0.05, -0.3, 0.35];
    let old: Vec<f32> = current.iter().zip(shifts).map(|(l, s)| l - s).collect();
    let mut policy = PolicyRows::default();
    policy
        .push_answer(
            &[0, 1, 2],
            &tokens[..3],
            &[-1.0, -2.5, -0.3],
            &old[..3],
            &[1.0, 0.8, 1.3],
        )
        .unwrap();
    policy
        .push_answer(&[3, 4], &tokens[3..], &[-0.7, -1.9], &old[3..], &[0.9, 1.1])
        .unwrap();
    let labels: Vec<u32> = vec![3, 3, 1, 0, 2];
    let loss = |w: &Tensor| -> candle_core::Result<Tensor> {
        let logits = x.matmul(w)?;
        let single =
            single_step_loss(&logits, &teacher, &policy).map_err(candle_core::Error::wrap)?;
        let long = long_term_loss(&logits, &policy, 0.2).map_err(candle_core::Error::wrap)?;
        let ids = Tensor::from_vec(labels.clone(), (rows, 1), &dev)?;
        let ce = mmkd::distill::log_softmax(&logits)
            .map_err(candle_core::Error::wrap)?
            .gather(&ids, 1)?
            .mean_all()?
            .neg()?;
        (single + long)? + ce
    };
    let (analytic, numeric) = gradients(loss, &w0, 1e-6).unwrap();
    let worst = analytic
        .iter()
        .zip(&numeric)
        .map(|(a, n)| (a - n).abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-6,
        "analytic vs numeric gradient differ by {worst}"
    );
    assert!(
        analytic.iter().any(|g| g.abs() > 1e-3),
        "the gradient is not trivial"
    );
}
