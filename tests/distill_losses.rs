//! Distillation losses against PyTorch: values and gradients from
//! `tests/fixtures/distill/make_distill_fixture.py` (float64 references from the stored f32
//! inputs; see the script for the data: 3 padded samples, one text-only, 0/1/2 images).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
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
        candle_core::safetensors::load(dir().join("distill.safetensors"), &Device::Cpu).unwrap();
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
    let fx = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
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
