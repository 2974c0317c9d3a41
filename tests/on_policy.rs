//! On-policy distillation through the CLI: `mmkd gkd` with λ = 0 and β = 0 is DFT with the
//! forward-KL response term, step for step; with λ > 0 the student answers, its answers are
//! logged with both models' log-probabilities, counted, and a killed run resumes bit-exactly;
//! sequence-level KD trains on the teacher's answers; teachers that cannot score rollouts are
//! refused.

mod common;

use std::path::Path;

use common::mmkd;
use common::world::{metrics, resumes_bit_exactly, stage_args as run_args, world};
use mmkd::stages::rollout::{Responder, RolloutRecord, ROLLOUTS_FILE};

fn run(args: &[String]) -> (bool, String, String) {
    mmkd(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn run_ok(args: &[String]) -> String {
    let (ok, out, err) = run(args);
    assert!(ok, "mmkd {args:?} failed: {err}");
    out
}

fn rollouts(dir: &Path) -> Vec<RolloutRecord> {
    std::fs::read_to_string(dir.join(ROLLOUTS_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn summary(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn gkd_at_lambda_0_and_beta_0_is_forward_kl_dft_step_for_step() {
    let w = world();
    let gkd = run_args(
        w,
        "gkd",
        "teacher",
        "gkd-teacher-forced",
        4,
        &["rollout.lambda=0", r#"objective=[{term="gkd", beta=0.0}]"#],
    );
    let dft = run_args(
        w,
        "dft",
        "teacher",
        "dft-forward-kl",
        4,
        &[r#"objective=[{term="mdist.response", name="l_gkd", divergence="forward_kl"}]"#],
    );
    run_ok(&gkd);
    run_ok(&dft);
    let weights = |dir: &str| std::fs::read(w.root.join(dir).join("model.safetensors")).unwrap();
    assert!(
        weights("gkd-teacher-forced") == weights("dft-forward-kl"),
        "GKD at λ = 0, β = 0 trained other weights than DFT with forward KL"
    );
    let losses =
        |dir: &str| -> Vec<f32> { metrics(&w.root.join(dir)).iter().map(|m| m.loss).collect() };
    assert_eq!(losses("gkd-teacher-forced"), losses("dft-forward-kl"));
    // No micro-batch was answered by a model.
    let counts = &summary(&w.root.join("gkd-teacher-forced"))["rollouts"];
    assert_eq!(counts["answers"], 0, "{counts}");
}

#[test]
fn gkd_trains_on_the_students_answers_logs_them_and_resumes_bit_exactly() {
    let w = world();
    let sets = [
        "rollout.lambda=1",
        "rollout.max_new_tokens=6",
        "rollout.log_every=3",
        "train.save_every=2",
        "train.keep_last=6",
    ];
    let args = |out: &str| run_args(w, "gkd", "teacher", out, 12, &sets);
    resumes_bit_exactly(args, "gkd-on-policy", "gkd-on-policy-killed");
    let dir = w.root.join("gkd-on-policy");
    let records = rollouts(&dir);
    assert!(!records.is_empty());
    // Steps 3, 6, 9, 12 log every answer they trained on.
    let steps: std::collections::BTreeSet<usize> = records.iter().map(|r| r.step).collect();
    assert_eq!(steps.into_iter().collect::<Vec<_>>(), [3, 6, 9, 12]);
    for r in &records {
        assert_eq!(r.responder, Responder::Student);
        let n = r.answer_ids.len();
        assert!(n > 0 && n <= 6 + 2, "{r:?}");
        assert_eq!(r.teacher_logprobs.len(), n);
        assert_eq!(r.student_logprobs.len(), n);
        assert!(r
            .teacher_logprobs
            .iter()
            .chain(&r.student_logprobs)
            .all(|&l| l <= 0.0 && l.is_finite()));
        let reward: f32 = r
            .teacher_logprobs
            .iter()
            .zip(&r.student_logprobs)
            .map(|(p, q)| p - q)
            .sum();
        assert!((reward - r.reward).abs() < 1e-4, "{r:?}");
        // An answer cut by the budget has exactly the budget and no end of answer.
        assert_eq!(r.capped, n == 6, "{r:?}");
    }
    // The resumed run logged the same answers.
    let killed = rollouts(&w.root.join("gkd-on-policy-killed"));
    assert_eq!(
        serde_json::to_string(&killed).unwrap(),
        serde_json::to_string(&records).unwrap()
    );
    // Every micro-batch was the student's, and the counts add up over the steps.
    let counts = &summary(&dir)["rollouts"];
    assert_eq!(counts["student_micro_batches"], 12, "{counts}");
    assert_eq!(counts["teacher_micro_batches"], 0, "{counts}");
    let per_step: usize = metrics(&dir)
        .iter()
        .map(|m| m.rollouts.unwrap().answers)
        .sum();
    assert_eq!(counts["answers"], per_step, "{counts}");
    assert!(metrics(&dir).iter().all(|m| m.term("l_gkd").is_some()));
}

#[test]
fn sequence_level_kd_trains_on_the_teachers_greedy_answers() {
    let w = world();
    let args = run_args(
        w,
        "gkd",
        "teacher",
        "gkd-seq-kd",
        3,
        &[
            "rollout.lambda=0",
            "rollout.seq_kd=true",
            "rollout.log_every=1",
            "rollout.max_new_tokens=5",
        ],
    );
    let out = run_ok(&args);
    assert!(
        out.contains("rollouts: 0 micro-batches answered by the student, 3 by the teacher"),
        "{out}"
    );
    let records = rollouts(&w.root.join("gkd-seq-kd"));
    assert!(!records.is_empty());
    for r in &records {
        assert_eq!(r.responder, Responder::Teacher);
    }
    // The teacher's answers are greedy: the same answers again in a second run with another
    // sampling seed.
    let again = run_args(
        w,
        "gkd",
        "teacher",
        "gkd-seq-kd-again",
        3,
        &[
            "rollout.lambda=0",
            "rollout.seq_kd=true",
            "rollout.log_every=1",
            "rollout.max_new_tokens=5",
            "rollout.temperature=2.0",
        ],
    );
    run_ok(&again);
    let ids = |dir: &str| -> Vec<Vec<u32>> {
        rollouts(&w.root.join(dir))
            .into_iter()
            .map(|r| r.answer_ids)
            .collect()
    };
    assert_eq!(ids("gkd-seq-kd"), ids("gkd-seq-kd-again"));
}

#[test]
fn rollouts_need_a_teacher_that_can_score_them() {
    let w = world();
    let mut args = run_args(w, "gkd", "teacher", "gkd-no-teacher", 2, &[]);
    let at = args.iter().position(|a| a == "--teacher").unwrap();
    args.drain(at..at + 2);
    let (ok, _, err) = run(&args);
    assert!(!ok && err.contains("--teacher"), "{err}");
    // A teacher of another tokenizer cannot read the student's answers.
    let (ok, _, err) = run(&run_args(w, "gkd", "teacher-b", "gkd-other-tokens", 2, &[]));
    assert!(!ok && err.contains("tokenizer"), "{err}");
    let (ok, _, err) = run(&run_args(
        w,
        "gkd",
        "teacher",
        "gkd-bad-lambda",
        2,
        &["rollout.lambda=1.5"],
    ));
    assert!(
        !ok && err.contains("rollout.lambda must be in [0, 1], got 1.5"),
        "{err}"
    );
}

#[test]
fn minillm_trains_by_policy_gradient_with_the_data_ce_and_resumes_bit_exactly() {
    let w = world();
    let sets = [
        "rollout.max_new_tokens=6",
        "rollout.log_every=4",
        "train.save_every=2",
        "train.keep_last=6",
    ];
    let args = |out: &str| run_args(w, "minillm", "teacher", out, 12, &sets);
    resumes_bit_exactly(args, "minillm", "minillm-killed");
    let dir = w.root.join("minillm");
    let steps = metrics(&dir);
    for m in &steps {
        for term in ["l_single", "l_long", "ce"] {
            assert!(
                m.term(term).is_some_and(f32::is_finite),
                "step {}: {term}",
                m.step
            );
        }
        // The single-step part is a weighted reverse KL: never negative.
        assert!(m.term("l_single").unwrap() >= 0.0);
    }
    // MiniLLM's defaults: every micro-batch answered by the student (teacher-mixed).
    let counts = &summary(&dir)["rollouts"];
    assert_eq!(counts["student_micro_batches"], 12, "{counts}");
    let settings = &summary(&dir)["settings"]["train"]["rollout"];
    assert_eq!(settings["mix_alpha"], 0.2, "{settings}");
    assert_eq!(settings["lambda"], 1.0, "{settings}");
    assert!(rollouts(&dir)
        .iter()
        .all(|r| r.responder == Responder::Student));
}

#[test]
fn the_cross_entropy_of_a_student_answered_batch_is_on_the_datas_answers() {
    // Step 1 trains at learning rate 0 (warm-up), from the same student on the same batch:
    // MiniLLM's `ce` there is SFT's loss exactly, although every answer was the student's.
    let w = world();
    let minillm = run_args(
        w,
        "minillm",
        "teacher",
        "minillm-ce",
        2,
        &["rollout.max_new_tokens=4"],
    );
    run_ok(&minillm);
    let mut sft = run_args(w, "sft", "teacher", "sft-ce", 2, &[]);
    let at = sft.iter().position(|a| a == "--teacher").unwrap();
    sft.drain(at..at + 2);
    run_ok(&sft);
    let first = |dir: &str| metrics(&w.root.join(dir)).remove(0);
    let (rolled, data) = (first("minillm-ce"), first("sft-ce"));
    assert_eq!(rolled.lr, 0.0);
    assert_eq!(rolled.rollouts.unwrap().student_micro_batches, 1);
    assert_eq!(rolled.term("ce"), Some(data.loss));
}

#[test]
fn a_nan_reward_stops_the_run_naming_the_step_and_keeping_the_last_checkpoint() {
    let w = world();
    let args = run_args(
        w,
        "minillm",
        "teacher",
        "minillm-diverged",
        20,
        &[
            "lr=1e12",
            "rollout.max_new_tokens=4",
            "train.save_every=1",
            "train.schedule.warmup={ steps = 0 }",
        ],
    );
    let (ok, _, err) = run(&args);
    assert!(!ok, "a run at lr 1e12 should diverge");
    assert!(err.contains("is NaN") || err.contains("is inf"), "{err}");
    assert!(
        err.contains("at step") && err.contains("(samples "),
        "{err}"
    );
    assert!(err.contains("last good checkpoint"), "{err}");
    let out = w.root.join("minillm-diverged");
    assert!(!out.join("summary.json").exists());
    assert!(mmkd::train::state::latest_checkpoint(&out)
        .unwrap()
        .is_some());
}

#[test]
fn minillm_terms_without_rollouts_are_refused() {
    let w = world();
    let (ok, _, err) = run(&run_args(
        w,
        "dft",
        "teacher",
        "dft-minillm-terms",
        2,
        &[r#"objective=[{term="minillm.long"}]"#],
    ));
    assert!(!ok && err.contains("[stages.dft.rollout]"), "{err}");
}

#[test]
fn rl_with_a_kd_shaped_task_reward_resumes_bit_exactly_and_counts_its_matches() {
    let w = world();
    let sets = [
        "rollout.kl_coef=0.1",
        "rollout.max_new_tokens=6",
        "train.save_every=2",
        "train.keep_last=6",
    ];
    let args = |out: &str| run_args(w, "rl", "teacher", out, 12, &sets);
    resumes_bit_exactly(args, "rl-kd", "rl-kd-killed");
    let dir = w.root.join("rl-kd");
    let steps = metrics(&dir);
    assert!(steps
        .iter()
        .all(|m| m.term("l_pg").is_some_and(f32::is_finite)));
    let counts = &summary(&dir)["rollouts"];
    assert_eq!(counts["student_micro_batches"], 12, "{counts}");
    let matches: usize = steps.iter().map(|m| m.rollouts.unwrap().matches).sum();
    assert_eq!(counts["matches"], matches, "{counts}");
    // The teacher as the reward (LLMR) trains too.
    let plain = run_args(
        w,
        "rl",
        "teacher",
        "rl-task",
        12,
        &["rollout.max_new_tokens=6", "rollout.reward=\"teacher\""],
    );
    run_ok(&plain);
    assert!(metrics(&w.root.join("rl-task"))
        .iter()
        .all(|m| m.term("l_pg").is_some_and(f32::is_finite)));
    // MiniLLM's reward is already the log-ratio: shaping it is refused.
    let (ok, _, err) = run(&run_args(
        w,
        "minillm",
        "teacher",
        "minillm-shaped",
        2,
        &["rollout.kl_coef=0.1"],
    ));
    assert!(
        !ok && err.contains("rollout.kl_coef shapes a task or teacher reward"),
        "{err}"
    );
}
