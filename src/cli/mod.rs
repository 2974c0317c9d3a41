//! The `mmkd` command line: one module per subcommand, this file only dispatches.

pub mod bench;
pub mod config;
pub mod data;
pub mod data_select;
pub mod demo;
pub mod distill_data;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod metrics;
pub mod moe_to_dense;
pub mod score;
pub mod serve;
pub mod teacher_cache;
pub mod tower;
pub mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::Stage;

#[derive(Debug, Parser)]
#[command(
    name = "mmkd",
    version,
    about = "Distil multimodal LLMs (LLaVA-KD) from the command line"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Architecture, parameters per module, dtype, image tokens per image.
    Inspect(inspect::InspectArgs),
    /// Log-probability of each answer token given image and prompt.
    Score(score::ScoreArgs),
    /// Generate an answer to a prompt about an image.
    Generate(generate::GenerateArgs),
    /// Serve a model on the OpenAI-compatible chat-completions API (loopback by default): the
    /// black-box teacher a data-distillation run or any OpenAI client can call.
    Serve(serve::ServeArgs),
    /// Preset keys and resolved settings: `config keys`, `config show PRESET --stage S`.
    Config(config::ConfigArgs),
    /// Data sets: synthetic data, tokenizer training, data checks.
    Data(data::DataArgs),
    /// The end-to-end demo: synthetic data, pre-trained vision tower, teacher, baseline and
    /// distilled students, report.
    Demo(demo::DemoArgs),
    /// Evaluate a model: VQA, captions, POPE, multiple choice; compare runs.
    Eval(eval::EvalArgs),
    /// Score prediction files against references (VQA, captions, POPE); no model needed.
    Metrics(metrics::MetricsArgs),
    /// Merge checkpoints of one architecture (LM-Cocktail): weights given (`--weights`) or
    /// from each model's loss on a few examples (`--auto-weights --examples FILE`).
    Merge(merge::MergeArgs),
    /// Gather a Mixture-of-Experts model's experts into a dense model (knowledge aggregation:
    /// `--method usage-avg|top-k|svd`, router usage measured on --data): a dense Qwen2/Llama
    /// LLaVA checkpoint for `--init`.
    MoeToDense(moe_to_dense::MoeToDenseArgs),
    /// Time one distillation step of a benchmark spec (samples/s, GFLOP/s, memory).
    Bench(bench::BenchArgs),
    /// Pre-train a vision tower before the LLaVA stages (`--objective labels|contrastive`);
    /// writes a SigLIP/CLIP vision checkpoint for `--vision` / `models.<role>.vision`.
    Tower(tower::TowerArgs),
    /// PT: pre-train on captions (plain template, objective `ce`). Trains the projector (the
    /// paper's) or the modules of `train.trainable` (the synthetic presets add the LLM).
    Pretrain(train::StageArgs),
    /// SFT: fine-tune projector + LLM on instructions (chat template, objective `ce`).
    Sft(train::StageArgs),
    /// DPT: distilled pre-training on captions, CE + α·L_res + β·L_vis + γ·L_rel against
    /// --teacher (or --teacher-cache); trains the projector or `train.trainable`'s modules.
    Dpt(train::StageArgs),
    /// DFT: distilled fine-tuning of projector + LLM on instructions, against --teacher (or
    /// --teacher-cache): CE + α·L_res + β·L_vis + γ·L_rel. Any stage's loss can be replaced by
    /// an objective in the preset (`[[stages.<stage>.objective]]`, see the README).
    Dft(train::StageArgs),
    /// GKD: on-policy distillation of projector + LLM on instructions against --teacher: a
    /// share λ of the micro-batches answered by the student itself (`[rollout]`: λ 0.5,
    /// temperature 0.9), the loss GKD's generalized JSD(β) at the response tokens.
    Gkd(train::StageArgs),
    /// MiniLLM: reverse-KL distillation of projector + LLM by policy gradient on answers the
    /// student samples (teacher-mixed sampling α 0.2, length-normalised rewards, clipping),
    /// plus the cross-entropy on the data, against --teacher.
    Minillm(train::StageArgs),
    /// RL: the clipped policy gradient on answers the student samples, rewarded by exact
    /// match with the data's answer (`rollout.reward = "task"`), optionally shaped by the KL to
    /// --teacher (`rollout.kl_coef`) or by the teacher's logits as rewards (`"teacher"`, LLMR).
    Rl(train::StageArgs),
    /// Data distillation: a teacher (--teacher MODEL, or --teacher-url of a chat-completions
    /// server) writes a LLaVA dataset from unlabeled images and a recipe (prompt templates,
    /// seed knowledge, generation settings), filtered, resumable, with a manifest.
    DistillData(distill_data::DistillDataArgs),
    /// Run a teacher over a stage's data once and store its top-k log-probs and relation
    /// matrices, for `dpt|dft --teacher-cache`.
    TeacherCache(teacher_cache::TeacherCacheArgs),
}

pub fn run() -> Result<()> {
    keep_element_wise_ops_on_the_calling_thread();
    let cli = Cli::parse();
    refuse_ranks_for_single_process_commands(&cli.command)?;
    // The command runs on a rayon worker thread, so the parallel kernels and matmuls it starts
    // share the pool's threads directly instead of waking a sleeping pool from outside (two
    // futex round trips) for every op.
    rayon::scope(|_| match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Score(args) => score::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Data(args) => data::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Metrics(args) => metrics::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Merge(args) => merge::run(args),
        Command::MoeToDense(args) => moe_to_dense::run(args),
        Command::Tower(args) => tower::run(args),
        Command::Pretrain(args) => train::run(args, Stage::Pretrain),
        Command::Sft(args) => train::run(args, Stage::Sft),
        Command::Dpt(args) => train::run(args, Stage::Dpt),
        Command::Dft(args) => train::run(args, Stage::Dft),
        Command::Gkd(args) => train::run(args, Stage::Gkd),
        Command::Minillm(args) => train::run(args, Stage::Minillm),
        Command::Rl(args) => train::run(args, Stage::Rl),
        Command::TeacherCache(args) => teacher_cache::run(args),
        Command::DistillData(args) => distill_data::run(args),
        Command::Config(args) => config::run(args),
    })
}

/// Under `mpirun -np N` (N > 1) only the training stages and the teacher cache split their
/// work over the ranks; any other command would run N times over the same output.
fn refuse_ranks_for_single_process_commands(command: &Command) -> Result<()> {
    let world = crate::runtime::world::world();
    let parallel = matches!(
        command,
        Command::Pretrain(_)
            | Command::Sft(_)
            | Command::Dpt(_)
            | Command::Dft(_)
            | Command::Gkd(_)
            | Command::Minillm(_)
            | Command::Rl(_)
            | Command::TeacherCache(_)
            | Command::Bench(_)
    );
    if world.size() > 1 && !parallel {
        anyhow::bail!(
            "this command runs in one process, not as {} MPI ranks: under mpirun run the \
             training stages (pretrain, sft, dpt, dft, gkd, minillm, rl), teacher-cache or bench",
            world.size()
        );
    }
    Ok(())
}

/// candle runs element-wise ops on its own busy-waiting thread pool, next to the rayon pool
/// its matmuls use; on a machine with few cores the two pools fight for them (the DFT step ran
/// 2× slower on 2 cores, see docs/performance.md). Unless the user chose, element-wise work
/// stays on the calling thread. Must run before the first tensor op (the pool is built once).
fn keep_element_wise_ops_on_the_calling_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// A command's report: its summary as one JSON line (`--json`), else `text` for people.
pub fn print_report(
    json: bool,
    summary: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

/// An error as `mmkd` prints it: the whole chain on one line (`a: b: c`), runs of spaces (a
/// message wrapped in the source without a line continuation) collapsed to one.
pub fn error_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    let mut out = String::with_capacity(text.len());
    let mut last_space = false;
    for c in text.chars() {
        let space = c == ' ';
        if !(space && last_space) {
            out.push(c);
        }
        last_space = space;
    }
    format!("error: {out}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_print_on_one_line_without_runs_of_spaces() {
        let err = anyhow::anyhow!("pass --teacher DIR, or --teacher-cache CACHE (written by              `mmkd teacher-cache`)")
            .context("loading   the stage");
        assert_eq!(
            super::error_line(&err),
            "error: loading the stage: pass --teacher DIR, or --teacher-cache CACHE (written by `mmkd teacher-cache`)"
        );
    }
}

#[cfg(test)]
mod help_tests {
    use clap::CommandFactory;

    /// Every flag and argument of every command, with the command path, that has no help text.
    fn without_help(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                out.push(format!("{path} --{id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                out.push(format!("{path} {} (the command)", sub.get_name()));
            }
            without_help(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_command_and_flag_has_help() {
        let mut missing = Vec::new();
        without_help(&super::Cli::command(), "mmkd", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }
}
