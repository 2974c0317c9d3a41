//! Methods beyond LLaVA-KD that the demo can add as rows next to it (`--methods`), each built
//! on the seed's own teacher and students and evaluated like them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{run_plan, say, StagePlan};
use crate::config::{Document, LoraSettings, Module, Role, Stage};

/// An opt-in row of the demo.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DemoMethod {
    /// The distilled student's DFT through LoRA adapters on every linear layer of its LLM
    /// (rank 16, alpha 32, the full DFT's learning rate) instead of full weights.
    Lora,
    /// LM-Cocktail, twice: the distilled student merged with the baseline (`merged`), and with
    /// its own SFT checkpoint, the model its DFT fine-tuned (`merged-sft`); weights from each
    /// one's loss on 16 held-out instructions (τ = 5).
    Merge,
    /// Switch-KD's DFT (the `switch-kd` preset's objective: CE + DBiLD at the response
    /// tokens + the visual switch) from the distilled student's SFT checkpoint.
    Switch,
    /// LLaVA-KD's DFT plus layer-wise hidden-state distillation (every student layer to the
    /// teacher layer at the same depth, 1 − cosine through learned projections, response and
    /// image positions).
    Hidden,
    /// DFT from a teacher trained on another tokenizer (the data's, at ¾ of its vocabulary
    /// size): CE + ULD on the aligned response tokens.
    Uld,
    /// GKD in place of LLaVA-KD's DFT (`mmkd gkd`: λ 0.5 of the micro-batches answered by
    /// the student at temperature 0.9, generalized JSD β 0.5) from the distilled student's
    /// SFT checkpoint.
    Gkd,
    /// MiniLLM in place of LLaVA-KD's DFT (`mmkd minillm`: every micro-batch answered by the
    /// student, teacher-mixed α 0.2; single-step + clipped long-term reverse KL + CE on the
    /// data) from the distilled student's SFT checkpoint.
    Minillm,
    /// RL in place of LLaVA-KD's DFT (`mmkd rl`), twice: rewarded by exact match with the
    /// data's answer alone (`rl`), and shaped by the KL to the teacher, β_KL 0.1 (`rl-kd`).
    Rl,
    /// A Mixture-of-Experts teacher (Qwen2-MoE, 4 experts, top-2, the dense teacher's active
    /// width) and dense students of its size from each knowledge aggregation or at random,
    /// distilled from it with and without knowledge augmentation.
    Moe,
    /// Data distillation: a student trained on data the teacher wrote (`mmkd distill-data`)
    /// instead of the ground truth, and DFT on divergence-selected vs random 10 % / 25 %
    /// subsets (`mmkd data select`).
    Data,
}

/// The KL-to-teacher shaping of the `rl-kd` row.
pub const RL_KL_COEF: &str = "rollout.kl_coef=0.1";

/// The `switch-kd` preset's DFT objective.
pub const SWITCH_OBJECTIVE: &str = "[{ term = \"ce\" }, { term = \"mdist.response\", divergence = \
     { kind = \"dbild\", max_k = 16 } }, { term = \"switch\", divergence = { kind = \"dbild\", \
     max_k = 16 } }]";
/// LLaVA-KD's DFT objective (the shapes presets' `[distill]` weights) with the hidden term.
pub const HIDDEN_OBJECTIVE: &str = "[{ term = \"ce\" }, { term = \"mdist.response\" }, \
     { term = \"mdist.visual\" }, { term = \"rdist\", weight = 0.5 }, { term = \"hidden\", \
     distance = \"cosine\", positions = \"both\" }]";
/// CE and ULD against a teacher with another tokenizer.
pub const ULD_OBJECTIVE: &str = "[{ term = \"ce\" }, { term = \"uld\" }]";
/// The other tokenizer, under the data directory.
pub const OTHER_TOKENIZER: &str = "tokenizer-other.json";

impl DemoMethod {
    /// Its rows in the report (and their directories under each seed).
    pub fn rows(self) -> &'static [&'static str] {
        match self {
            DemoMethod::Lora => &["distilled-lora"],
            DemoMethod::Merge => &["merged", "merged-sft"],
            DemoMethod::Switch => &["switch-kd"],
            DemoMethod::Hidden => &["distilled-hidden"],
            DemoMethod::Uld => &["uld"],
            DemoMethod::Gkd => &["gkd"],
            DemoMethod::Minillm => &["minillm"],
            DemoMethod::Rl => &["rl", "rl-kd"],
            DemoMethod::Moe => super::moe::ROWS,
            DemoMethod::Data => super::teacher_data::ROWS,
        }
    }

    /// One line for the report.
    pub fn describe(self) -> &'static str {
        match self {
            DemoMethod::Lora => {
                "`distilled-lora`: DPT → SFT as the distilled student, then its DFT through LoRA \
                 adapters (rank 16, alpha 32, every linear layer of the LLM) — the same steps \
                 and learning rate; the projector trains fully. (LLaVA-1.5's 10× learning rate \
                 for adapters diverged here: these models already train at 3e-3.)"
            }
            DemoMethod::Merge => {
                "`merged`, `merged-sft`: LM-Cocktail — the distilled student averaged with the \
                 baseline student, or with its own SFT checkpoint (the model its DFT fine-tuned), \
                 each weighted by softmax(−loss/5) of its loss on 16 held-out instructions; no \
                 training."
            }
            DemoMethod::Switch => {
                "`switch-kd`: the distilled student's SFT checkpoint fine-tuned with Switch-KD \
                 instead of LLaVA-KD's DFT — CE + DBiLD at the response tokens + the visual \
                 switch (the teacher reading the student's visual tokens through a learned \
                 bridge, compared by DBiLD with it reading its own); same steps."
            }
            DemoMethod::Hidden => {
                "`distilled-hidden`: LLaVA-KD's DFT plus the layer-wise hidden-state term (each \
                 student layer to the teacher layer at the same depth, 1 − cosine through \
                 learned projections, at response and image positions, weight 1); same steps."
            }
            DemoMethod::Uld => {
                "`uld`: the distilled student's SFT checkpoint fine-tuned against a second \
                 teacher, trained like the first but on another tokenizer (the data's at ¾ of \
                 its vocabulary size: other merges and ids) — CE + ULD on the response tokens \
                 aligned by where they start in the answer; the teacher's own training time is \
                 counted in the row's."
            }
            DemoMethod::Gkd => {
                "`gkd`: the distilled student's SFT checkpoint fine-tuned with GKD instead of \
                 LLaVA-KD's DFT — half of the micro-batches (λ 0.5) answered by the student \
                 itself (temperature 0.9, up to 32 tokens), the generalized JSD (β 0.5) at the \
                 response tokens against the teacher on the same sequences; same steps."
            }
            DemoMethod::Minillm => {
                "`minillm`: the distilled student's SFT checkpoint fine-tuned with MiniLLM \
                 instead of LLaVA-KD's DFT — every micro-batch answered by the student, sampled \
                 from 0.2·teacher + 0.8·student (up to 32 tokens); the single-step reverse KL, \
                 the clipped length-normalised policy gradient and the CE on the data's \
                 answers; same steps."
            }
            DemoMethod::Rl => {
                "`rl`, `rl-kd`: the distilled student's SFT checkpoint fine-tuned by policy \
                 gradient on its own answers (temperature 1, up to 32 tokens) instead of \
                 LLaVA-KD's DFT — rewarded 1 when the answer equals the data's (VQA-normalised), \
                 less the micro-batch's mean; `rl-kd` shapes that reward with −0.1 × the \
                 answer's Σ log q − log p (its KL to the teacher); same steps."
            }
            DemoMethod::Data => super::teacher_data::DESCRIBE_DATA,
            DemoMethod::Moe => {
                "`moe-teacher`: the teacher's PT → SFT with a Qwen2-MoE LLM (4 experts of 3/8 the \
                 dense MLP's width, top-2 renormalised, a shared expert of 1/4: the dense \
                 teacher's active width; CE + 0.01 × the Switch balancing loss). `dense-*`: \
                 dense Qwen2 students of its size, initialised by `mmkd moe-to-dense` \
                 (`usage-avg`, `top-k`, `svd` at the top-2 width; router usage on the val \
                 instructions) or at random (the dense teacher's LLM shape and the shared \
                 tower), each distilled from the MoE teacher by one DFT epoch; `-ka` with \
                 knowledge augmentation (the teacher averaged over 3 routings)."
            }
        }
    }
}

/// The DFT stage of the LoRA row.
pub fn lora_settings() -> LoraSettings {
    LoraSettings {
        rank: 16,
        alpha: 32.0,
        targets: vec![mmkd_nn::lora::ALL_LINEAR.into()],
        modules: vec![Module::Llm],
        rslora: false,
        dropout: 0.0,
    }
}

/// One seed of the demo, as a method building on it sees it.
pub struct SeedRun<'a> {
    pub doc: &'a Document,
    pub seed_dir: &'a Path,
    pub data: &'a Path,
    pub template: &'a str,
    pub dft_epochs: usize,
    /// The baseline student's SFT epochs (its SFT and DFT budget).
    pub baseline_sft_epochs: usize,
    /// The recipe of the data-distillation rows.
    pub data_recipe: &'a str,
    /// The teacher's PT and SFT epochs (for a second teacher).
    pub teacher_epochs: (usize, usize),
    pub seed: u64,
    pub progress: bool,
}

/// Builds the method's models for one seed (unless done earlier); returns each row's name,
/// directory and the seconds spent.
pub fn run_method(method: DemoMethod, run: &SeedRun<'_>) -> Result<Vec<(String, PathBuf, f64)>> {
    let seed_dir = run.seed_dir;
    match method {
        DemoMethod::Moe => super::moe::run(run),
        DemoMethod::Data => super::teacher_data::run(run),
        DemoMethod::Lora => {
            let row = method.rows()[0];
            let plan = StagePlan {
                stage: Stage::Dft,
                role: Role::Student,
                dir: row,
                init: Some("distilled/sft"),
                teacher: Some("teacher/sft"),
                tower: None,
                epochs: run.dft_epochs,
                lora: Some(lora_settings()),
                objective: None,
                tokenizer: None,
                sets: &[],
            };
            let seconds = run_plan(run.doc, seed_dir, run.data, &plan, run.seed, run.progress)?;
            Ok(vec![(row.to_string(), seed_dir.join(row), seconds)])
        }
        DemoMethod::Merge => {
            let with_baseline = cocktail(run, "merged", "baseline/sft")?;
            let with_sft = cocktail(run, "merged-sft", "distilled/sft")?;
            Ok(vec![with_baseline, with_sft])
        }
        DemoMethod::Switch | DemoMethod::Hidden => {
            let row = method.rows()[0];
            let objective = if method == DemoMethod::Switch {
                SWITCH_OBJECTIVE
            } else {
                HIDDEN_OBJECTIVE
            };
            let seconds = run_plan(
                run.doc,
                seed_dir,
                run.data,
                &dft_from_distilled_sft(run, row, "teacher/sft", objective),
                run.seed,
                run.progress,
            )?;
            Ok(vec![(row.to_string(), seed_dir.join(row), seconds)])
        }
        DemoMethod::Gkd | DemoMethod::Minillm => {
            let row = method.rows()[0];
            let plan = StagePlan {
                stage: if method == DemoMethod::Gkd {
                    Stage::Gkd
                } else {
                    Stage::Minillm
                },
                objective: None,
                ..dft_from_distilled_sft(run, row, "teacher/sft", "")
            };
            let seconds = run_plan(run.doc, seed_dir, run.data, &plan, run.seed, run.progress)?;
            Ok(vec![(row.to_string(), seed_dir.join(row), seconds)])
        }
        DemoMethod::Rl => {
            let mut rows = Vec::new();
            for (row, sets) in method.rows().iter().zip([&[][..], &[RL_KL_COEF][..]]) {
                let plan = StagePlan {
                    stage: Stage::Rl,
                    objective: None,
                    sets,
                    ..dft_from_distilled_sft(run, row, "teacher/sft", "")
                };
                let seconds = run_plan(run.doc, seed_dir, run.data, &plan, run.seed, run.progress)?;
                rows.push((row.to_string(), seed_dir.join(row), seconds));
            }
            Ok(rows)
        }
        DemoMethod::Uld => {
            let row = method.rows()[0];
            other_tokenizer(run.data, run.progress)?;
            let tower = seed_dir
                .join(super::TOWER_DIR)
                .exists()
                .then_some(super::TOWER_DIR);
            let teacher = [
                StagePlan {
                    stage: Stage::Pretrain,
                    role: Role::Teacher,
                    dir: "teacher-other/pt",
                    init: None,
                    teacher: None,
                    tower,
                    epochs: run.teacher_epochs.0,
                    lora: None,
                    objective: None,
                    tokenizer: Some(OTHER_TOKENIZER),
                    sets: &[],
                },
                StagePlan {
                    stage: Stage::Sft,
                    role: Role::Teacher,
                    dir: "teacher-other/sft",
                    init: Some("teacher-other/pt"),
                    teacher: None,
                    tower: None,
                    epochs: run.teacher_epochs.1,
                    lora: None,
                    objective: None,
                    tokenizer: Some(OTHER_TOKENIZER),
                    sets: &[],
                },
            ];
            let mut seconds = 0.0;
            for plan in &teacher {
                seconds += run_plan(run.doc, seed_dir, run.data, plan, run.seed, run.progress)?;
            }
            seconds += run_plan(
                run.doc,
                seed_dir,
                run.data,
                &dft_from_distilled_sft(run, row, "teacher-other/sft", ULD_OBJECTIVE),
                run.seed,
                run.progress,
            )?;
            Ok(vec![(row.to_string(), seed_dir.join(row), seconds)])
        }
    }
}

/// A DFT of the distilled student's SFT checkpoint into `row`, against `teacher`, with
/// `objective`, for as many epochs as LLaVA-KD's DFT.
fn dft_from_distilled_sft<'a>(
    run: &SeedRun<'_>,
    row: &'a str,
    teacher: &'a str,
    objective: &'a str,
) -> StagePlan<'a> {
    StagePlan {
        stage: Stage::Dft,
        role: Role::Student,
        dir: row,
        init: Some("distilled/sft"),
        teacher: Some(teacher),
        tower: None,
        epochs: run.dft_epochs,
        lora: None,
        objective: Some(objective),
        tokenizer: None,
        sets: &[],
    }
}

/// The data's tokenizer again at ¾ of its vocabulary size ([`OTHER_TOKENIZER`]), made once.
fn other_tokenizer(data: &Path, progress: bool) -> Result<()> {
    let path = data.join(OTHER_TOKENIZER);
    if path.exists() {
        return Ok(());
    }
    let own = mmkd_datasets::load_tokenizer(&data.join("tokenizer.json"))?;
    let size = own.get_vocab_size(true) * 3 / 4;
    say(
        progress,
        &format!("data: training another tokenizer ({size} entries)"),
    );
    let (texts, _) = mmkd_datasets::collect_training_text(&data.join("train"))?;
    let tok = mmkd_datasets::train_bpe(&texts, size)?;
    mmkd_datasets::save_tokenizer(&tok, &path)?;
    Ok(())
}

/// LM-Cocktail of the distilled student and `other` into `row`, with weights from 16
/// held-out instructions.
fn cocktail(run: &SeedRun<'_>, row: &str, other: &str) -> Result<(String, PathBuf, f64)> {
    let out = run.seed_dir.join(row);
    if out.join(crate::merge::MERGE_FILE).exists() {
        say(run.progress, &format!("{row}: done earlier, skipped"));
        return Ok((row.to_string(), out, 0.0));
    }
    say(
        run.progress,
        &format!("{row}: LM-Cocktail merge of distilled/dft and {other}"),
    );
    let started = Instant::now();
    let examples = run.seed_dir.join("merge-examples.json");
    let records: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(run.data.join("val/instruct.json"))
            .context("reading the held-out instructions")?,
    )?;
    std::fs::write(
        &examples,
        serde_json::to_string(&records[..records.len().min(16)])?,
    )?;
    crate::merge::merge(&crate::merge::MergeRequest {
        models: vec![run.seed_dir.join("distilled/dft"), run.seed_dir.join(other)],
        weights: crate::merge::MergeWeights::Auto {
            examples,
            images: run.data.to_path_buf(),
            tau: crate::merge::cocktail::DEFAULT_TAU,
            template: Some(run.template.to_string()),
            batch_size: crate::merge::cocktail::DEFAULT_BATCH_SIZE,
            max_length: 2048,
        },
        out: out.clone(),
        force: false,
    })?;
    Ok((row.to_string(), out, started.elapsed().as_secs_f64()))
}

/// Parameters of the model in `dir` as deployed (an adapter folded into its base has its
/// base's count).
pub fn parameter_count(dir: &Path) -> Result<usize> {
    let weights_dir = if crate::checkpoint::adapter::is_adapter(dir) {
        let base = crate::checkpoint::adapter::read_adapter(dir)?.base;
        PathBuf::from(base)
    } else {
        dir.to_path_buf()
    };
    let weights = crate::checkpoint::read_weights(&weights_dir, &candle_core::Device::Cpu)?;
    Ok(weights
        .names()
        .filter_map(|n| weights.get(n))
        .map(|t| t.elem_count())
        .sum())
}
