//! AdamW, clipping, accumulation and schedules against PyTorch/transformers
//! (`tests/fixtures/distill/make_distill_fixture.py`): a 6-step `torch.optim.AdamW` run with two
//! name-selected groups (different lr and weight decay, no decay on bias/norm/embedding),
//! `clip_grad_norm_` and transformers' cosine schedule with warmup; one parameter gets no
//! gradient in the first two steps.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{backprop::GradStore, Device, Tensor, Var};
use mmkd::train::{
    clip_grad_norm, AdamW, AdamWConfig, Decay, GradAccumulator, LrSchedule, ParamGroupConfig,
    ScheduleConfig, Warmup,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct OptimFixture {
    base_lr: f64,
    betas: [f64; 2],
    eps: f64,
    max_norm: f64,
    warmup_steps: usize,
    total_steps: usize,
    late_param: String,
    late_from_step: usize,
    groups: BTreeMap<String, GroupFixture>,
    params: BTreeMap<String, ParamFixture>,
    steps: Vec<StepFixture>,
}

#[derive(Deserialize)]
struct GroupFixture {
    lr_scale: f64,
    weight_decay: f64,
}

#[derive(Deserialize)]
struct ParamFixture {
    group: String,
    decays: bool,
}

#[derive(Deserialize)]
struct StepFixture {
    lr: f64,
    grad_norm: f64,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/distill")
}

struct Problem {
    fx: OptimFixture,
    t: HashMap<String, Tensor>,
}

impl Problem {
    fn load() -> Self {
        let fx = serde_json::from_str(&std::fs::read_to_string(dir().join("optim.json")).unwrap())
            .unwrap();
        let t =
            candle_core::safetensors::load(dir().join("optim.safetensors"), &Device::Cpu).unwrap();
        Self { fx, t }
    }

    /// Fresh parameters at their initial values, sorted by name.
    fn vars(&self) -> Vec<(String, Var)> {
        self.fx
            .params
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    Var::from_tensor(&self.t[&format!("init.{n}")]).unwrap(),
                )
            })
            .collect()
    }

    fn config(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.fx.betas[0],
            beta2: self.fx.betas[1],
            eps: self.fx.eps,
            groups: vec![
                self.group("projector", "model.multi_modal_projector."),
                self.group("llm", "model.language_model."),
            ],
            ..Default::default()
        }
    }

    fn group(&self, name: &str, prefix: &str) -> ParamGroupConfig {
        ParamGroupConfig {
            name: name.into(),
            prefixes: vec![prefix.into()],
            lr_scale: self.fx.groups[name].lr_scale,
            weight_decay: self.fx.groups[name].weight_decay,
        }
    }

    fn schedule(&self) -> LrSchedule {
        let cfg = ScheduleConfig {
            decay: Decay::Cosine,
            warmup: Warmup::Steps(self.fx.warmup_steps),
            min_lr_ratio: 0.0,
        };
        LrSchedule::new(&cfg, self.fx.base_lr, self.fx.total_steps).unwrap()
    }

    /// The loss terms of step `step` for the parameters accepted by `which`:
    /// Σ coef·(p − target)², the late parameter only from `late_from_step` on.
    fn loss(&self, vars: &[(String, Var)], step: usize, which: impl Fn(&str) -> bool) -> Tensor {
        let mut total: Option<Tensor> = None;
        for (name, var) in vars {
            if !which(name) || (*name == self.fx.late_param && step < self.fx.late_from_step) {
                continue;
            }
            let term = var
                .as_tensor()
                .sub(&self.t[&format!("target.{name}")])
                .unwrap()
                .sqr()
                .unwrap()
                .mul(&self.t[&format!("coef.{name}")])
                .unwrap()
                .sum_all()
                .unwrap();
            total = Some(match total {
                Some(acc) => acc.add(&term).unwrap(),
                None => term,
            });
        }
        total.unwrap()
    }

    /// Clips (checking the norm against PyTorch) and steps.
    fn step(&self, opt: &mut AdamW, vars: &[(String, Var)], mut grads: GradStore, step: usize) {
        let norm = clip_grad_norm(&mut grads, vars, self.fx.max_norm).unwrap();
        let want = self.fx.steps[step].grad_norm;
        assert!(
            (norm - want).abs() < 1e-5 * want,
            "step {step}: grad norm {norm} vs {want}"
        );
        let lr = self.schedule().lr(step);
        assert!(
            (lr - self.fx.steps[step].lr).abs() < 1e-15,
            "step {step}: lr {lr}"
        );
        let stats = opt.step(&grads, lr).unwrap();
        let expect_without = usize::from(step < self.fx.late_from_step);
        assert_eq!(stats.without_grad, expect_without, "step {step}");
    }

    fn run(&self, opt: &mut AdamW, vars: &[(String, Var)], steps: std::ops::Range<usize>) {
        for step in steps {
            let grads = self.loss(vars, step, |_| true).backward().unwrap();
            self.step(opt, vars, grads, step);
            self.check(vars, step);
        }
    }

    fn check(&self, vars: &[(String, Var)], step: usize) {
        for (name, var) in vars {
            let got = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = self.t[&format!("step{step}.{name}")]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 2e-6,
                    "step {step} `{name}`: {g} vs PyTorch {w}"
                );
            }
        }
    }
}

fn values(vars: &[(String, Var)]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|(_, v)| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn groups_and_decay_exemptions_match_the_fixture() {
    let p = Problem::load();
    let opt = AdamW::new(p.vars(), p.config()).unwrap();
    for (name, lr_scale, weight_decay) in opt.param_settings() {
        let param = &p.fx.params[&name];
        let group = &p.fx.groups[&param.group];
        assert_eq!(lr_scale, group.lr_scale, "{name}");
        let want = if param.decays {
            group.weight_decay
        } else {
            0.0
        };
        assert_eq!(weight_decay, want, "{name}");
    }
}

#[test]
fn adamw_trajectory_matches_pytorch() {
    let p = Problem::load();
    let vars = p.vars();
    let mut opt = AdamW::new(vars.clone(), p.config()).unwrap();
    p.run(&mut opt, &vars, 0..p.fx.total_steps);
    assert_eq!(opt.steps_taken(), p.fx.total_steps as u64);
}

#[test]
fn save_load_continue_equals_uninterrupted() {
    let p = Problem::load();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("optimizer.safetensors");

    let vars = p.vars();
    let mut opt = AdamW::new(vars.clone(), p.config()).unwrap();
    p.run(&mut opt, &vars, 0..3);
    opt.save(&path).unwrap();
    p.run(&mut opt, &vars, 3..p.fx.total_steps);
    let uninterrupted = values(&vars);

    // A new process: parameters restored from the step-2 values, optimizer from the file.
    let resumed: Vec<(String, Var)> =
        p.fx.params
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    Var::from_tensor(&p.t[&format!("step2.{n}")]).unwrap(),
                )
            })
            .collect();
    let mut opt = AdamW::new(resumed.clone(), p.config()).unwrap();
    opt.load(&path).unwrap();
    p.run(&mut opt, &resumed, 3..p.fx.total_steps);
    // Step-2 values came from PyTorch, not from this run, so equality is to f32 rounding.
    for (a, b) in values(&resumed)
        .iter()
        .flatten()
        .zip(uninterrupted.iter().flatten())
    {
        assert!((a - b).abs() < 2e-6, "{a} vs {b}");
    }
}

#[test]
fn accumulated_micro_batches_give_the_same_trajectory() {
    let p = Problem::load();
    let vars = p.vars();
    let mut opt = AdamW::new(vars.clone(), p.config()).unwrap();
    let mut acc = GradAccumulator::new(&vars);
    for step in 0..p.fx.total_steps {
        // Two micro-batches: the projector's terms, then the language model's; their sum is
        // the full loss.
        let projector = |n: &str| n.starts_with("model.multi_modal_projector.");
        acc.add(&p.loss(&vars, step, projector).backward().unwrap())
            .unwrap();
        acc.add(&p.loss(&vars, step, |n| !projector(n)).backward().unwrap())
            .unwrap();
        p.step(&mut opt, &vars, acc.sum().unwrap(), step);
        acc.reset();
        p.check(&vars, step);
    }
}

#[derive(Deserialize)]
struct ScheduleFixture {
    total_steps: usize,
    warmup_steps: usize,
    min_lr_rate: f64,
    cosine: Vec<f64>,
    linear: Vec<f64>,
    constant: Vec<f64>,
    cosine_min_lr: Vec<f64>,
    #[serde(rename = "ratio_0.03_of_5198")]
    ratio_steps: usize,
}

#[test]
fn schedules_match_transformers() {
    let fx: ScheduleFixture =
        serde_json::from_str(&std::fs::read_to_string(dir().join("schedule.json")).unwrap())
            .unwrap();
    for (decay, min_lr_ratio, want) in [
        (Decay::Cosine, 0.0, &fx.cosine),
        (Decay::Linear, 0.0, &fx.linear),
        (Decay::Constant, 0.0, &fx.constant),
        (Decay::Cosine, fx.min_lr_rate, &fx.cosine_min_lr),
    ] {
        let cfg = ScheduleConfig {
            decay,
            warmup: Warmup::Steps(fx.warmup_steps),
            min_lr_ratio,
        };
        let s = LrSchedule::new(&cfg, 2e-5, fx.total_steps).unwrap();
        for (step, w) in want.iter().enumerate() {
            let got = s.factor(step);
            assert!(
                (got - w).abs() < 1e-12,
                "{decay:?} min {min_lr_ratio} step {step}: {got} vs {w}"
            );
            assert!((s.lr(step) - 2e-5 * w).abs() < 1e-18);
        }
    }
    let ratio = ScheduleConfig {
        warmup: Warmup::Ratio(0.03),
        ..Default::default()
    };
    assert_eq!(
        LrSchedule::new(&ratio, 1e-3, 5198).unwrap().warmup_steps(),
        fx.ratio_steps
    );
}
