//! `mmkd inspect MODEL`: architecture, parameters per module, dtype, image tokens per image.

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use crate::checkpoint::LoadedModel;
use crate::models::llava::{BuildOptions, Trainable, LM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Checkpoint directory or hub id (`org/name`).
    pub model: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A Mixture-of-Experts model's per-layer expert load on this LLaVA JSON/JSONL data.
    #[arg(long, value_name = "DATA", requires = "images")]
    pub router_stats: Option<std::path::PathBuf>,
    /// Image root of --router-stats.
    #[arg(long)]
    pub images: Option<std::path::PathBuf>,
    /// Conversation template of --router-stats (default: the model's recorded one, else `plain`).
    #[arg(long)]
    pub template: Option<String>,
    /// Samples per forward of --router-stats.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

#[derive(Debug, Serialize)]
struct ModuleInfo {
    module: String,
    architecture: String,
    parameters: usize,
    dtype: String,
}

#[derive(Debug, Serialize)]
struct Inspection {
    model: String,
    directory: String,
    modules: Vec<ModuleInfo>,
    total_parameters: usize,
    image_token_id: u32,
    image_tokens_per_image: usize,
    image_size: usize,
    vocab_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    router_usage: Option<crate::experts::RouterUsage>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let bundle = LoadedModel::load(&args.model, &BuildOptions::new(Trainable::NONE, 0))?;
    let router_usage = match (&args.router_stats, &args.images) {
        (Some(data), Some(images)) => Some(crate::experts::measure_usage(
            &bundle,
            &crate::experts::UsageData {
                data,
                images,
                template: args.template.as_deref(),
                batch_size: args.batch_size,
                max_length: 2048,
            },
        )?),
        _ => None,
    };
    let (model, dir) = (&bundle.model, bundle.dir.clone());
    let cfg = &model.config;
    let dtype_of = |prefix: &str| {
        model
            .store
            .tensors()
            .iter()
            .find(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| format!("{:?}", t.dtype()).to_lowercase())
            .unwrap_or_else(|| "-".into())
    };
    let v = &cfg.vision_config;
    let t = &cfg.text_config;
    let lm_params = model.store.count(LM_PREFIX) + model.store.count("lm_head");
    let modules = vec![
        ModuleInfo {
            module: "vision_tower".into(),
            architecture: format!(
                "{:?}: {} layers, hidden {}, patch {} at {}px",
                v.kind, v.num_hidden_layers, v.hidden_size, v.patch_size, v.image_size
            ),
            parameters: model.store.count(VISION_PREFIX),
            dtype: dtype_of(VISION_PREFIX),
        },
        ModuleInfo {
            module: "multi_modal_projector".into(),
            architecture: format!(
                "{} ({})",
                cfg.projector_type.name(),
                serde_json::to_string(&cfg.projector_hidden_act)?
            ),
            parameters: model.store.count(PROJECTOR_PREFIX),
            dtype: dtype_of(PROJECTOR_PREFIX),
        },
        ModuleInfo {
            module: "language_model".into(),
            architecture: format!(
                "{:?}: {} layers, hidden {}, {} heads / {} kv heads, vocab {}{}",
                t.model_type,
                t.num_hidden_layers,
                t.hidden_size,
                t.num_attention_heads,
                t.kv_heads(),
                t.vocab_size,
                if t.tie_word_embeddings {
                    ", tied lm_head"
                } else {
                    ""
                }
            ) + &experts_note(model),
            parameters: lm_params,
            dtype: dtype_of(LM_PREFIX),
        },
    ];
    let info = Inspection {
        model: args.model.clone(),
        directory: dir.display().to_string(),
        total_parameters: modules.iter().map(|m| m.parameters).sum(),
        modules,
        image_token_id: cfg.image_token_id,
        image_tokens_per_image: model.tokens_per_image(),
        image_size: v.image_size,
        vocab_size: t.vocab_size,
        router_usage,
    };
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    println!("model: {} ({})", info.model, info.directory);
    println!(
        "{:<24} {:>14}  {:<8} architecture",
        "module", "parameters", "dtype"
    );
    for m in &info.modules {
        println!(
            "{:<24} {:>14}  {:<8} {}",
            m.module, m.parameters, m.dtype, m.architecture
        );
    }
    println!("{:<24} {:>14}", "total", info.total_parameters);
    println!(
        "image tokens per image: {} (image token id {}, {}px input)",
        info.image_tokens_per_image, info.image_token_id, info.image_size
    );
    if let Some(usage) = &info.router_usage {
        print!("{}", usage.table());
    }
    Ok(())
}

/// `, 4 experts (top-2) in layers 0, 2` for a Mixture-of-Experts language model.
fn experts_note(model: &crate::models::llava::LlavaModel) -> String {
    let sparse: Vec<String> = model
        .lm
        .sparse_blocks()
        .iter()
        .map(|(i, _)| i.to_string())
        .collect();
    match model.config.text_config.moe_shape() {
        Some(shape) if !sparse.is_empty() => format!(
            ", {} experts (top-{}) in layers {}",
            shape.experts,
            shape.top_k,
            sparse.join(", ")
        ),
        _ => String::new(),
    }
}
