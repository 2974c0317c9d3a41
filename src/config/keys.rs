//! Every preset key with its type and meaning (`mmkd config keys`). A test checks the table
//! against the settings types' fields (what a resolved stage serialises to), so a new setting
//! without a line here, or a line for a setting that is gone, fails.

/// One documented key. `train.*` keys may also be written under `[stages.<stage>]`,
/// `[<role>.train]` and `[<role>.stages.<stage>]` (later ones win, `--set` wins over all).
#[derive(Clone, Copy, Debug)]
pub struct KeyDoc {
    pub key: &'static str,
    pub kind: &'static str,
    pub meaning: &'static str,
}

const fn k(key: &'static str, kind: &'static str, meaning: &'static str) -> KeyDoc {
    KeyDoc { key, kind, meaning }
}

pub const KEYS: &[KeyDoc] = &[
    // [data]
    k("data.chat_template", "string", "template of the chat stages (sft, dft): a shipped name (plain, vicuna_v1, phi, compact, qwen2_base, chatml, llama3) or a TOML file"),
    k("data.max_length", "integer", "longest tokenized sample; longer ones are truncated (never inside an image block)"),
    k("data.pretrain_data", "path", "caption data of pretrain/dpt when --data is not given"),
    k("data.instruct_data", "path", "instruction data of sft/dft when --data is not given"),
    k("data.images", "path", "image root when --images is not given"),
    k("data.tokenizer", "path", "tokenizer.json of a freshly built model when --tokenizer is not given"),
    k("data.val_data", "path", "held-out data of the validation pass (--val-data)"),
    k("data.val_questions", "path", "held-out VQA questions of the validation pass (--val-questions)"),
    k("data.val_answers", "path", "their reference answers (--val-answers)"),
    // [train], [stages.<stage>], [<role>.train], [<role>.stages.<stage>]
    k("train.lr", "float", "base learning rate (stage defaults: 1e-3 pretrain/dpt, 2e-5 sft/dft)"),
    k("train.projector_lr_scale", "float", "learning-rate multiplier of the projector"),
    k("train.vision_lr_scale", "float", "learning-rate multiplier of the vision tower when it trains"),
    k("train.weight_decay", "float", "AdamW's decoupled weight decay (biases and norms exempt)"),
    k("train.schedule.decay", "string", "learning-rate decay after warmup: cosine, linear or constant"),
    k("train.schedule.warmup", "table", "{ ratio = 0.03 } of the steps, or { steps = N }"),
    k("train.schedule.min_lr_ratio", "float", "floor of the decay as a fraction of lr"),
    k("train.epochs", "integer", "passes over the data (--set epochs=N)"),
    k("train.max_steps", "integer", "stop after N optimizer steps; the schedule is laid out for N (--max-steps)"),
    k("train.batch_size", "integer", "samples per forward pass (micro-batch)"),
    k("train.grad_accum", "integer", "micro-batches per optimizer step"),
    k("train.parallel_micro_batches", "integer", "micro-batches of a step run side by side (changes no number)"),
    k("train.loss_chunk_rows", "integer", "logit rows the loss computes at once from hidden states (0: all; default 1024 on CUDA, all on CPU)"),
    k("train.max_grad_norm", "float", "global gradient-norm clipping (0: off)"),
    k("train.save_every", "integer", "resumable checkpoint every N steps (0: only the final model; --save-every)"),
    k("train.keep_last", "integer", "checkpoints kept"),
    k("train.seed", "integer", "seed of the data order (--seed); a fresh model's weights: models.<role>.seed"),
    k("train.template", "string", "template of this stage, over data.chat_template (pretraining: plain)"),
    k("train.frozen_dtype", "string", "dtype of frozen modules: f32, bf16 or f16"),
    k("train.device", "string", "where the models run: cpu, cuda or cuda:N (--device)"),
    k("train.validate_every", "integer", "validation pass every N steps and after the last (0: none; --validate-every)"),
    k("train.validate_questions", "integer", "held-out questions the validation pass answers"),
    k("train.group_by_modality_length", "bool", "keep image and text-only samples apart and group by length"),
    k("train.truncate_vocab", "integer", "cut teacher and student vocabularies to N (padding-only differences)"),
    k("train.teacher_routings", "integer", "a Mixture-of-Experts teacher's output averaged over N routings (knowledge augmentation: its top-k and N − 1 with the last expert drawn; 1 = off)"),
    k("train.trainable", "list", "modules the stage trains: any of vision, projector, llm (default: the paper's)"),
    k("train.max_loss_spike", "float", "stop a step whose loss is over N× the median of the last 20 steps, before its update (off when unset)"),
    k("train.max_grad_norm_spike", "float", "likewise for the gradient norm before clipping (off when unset)"),
    k("train.lora.rank", "integer", "train.lora (a table: low-rank adapters instead of full weights; the stage writes a PEFT adapter): rank r (8)"),
    k("train.lora.alpha", "float", "the adapters' scale is alpha / r (8)"),
    k("train.lora.rslora", "bool", "scale by alpha / √r instead (rsLoRA)"),
    k("train.lora.dropout", "float", "dropout on each adapter's input while training (PEFT's lora_dropout; default 0)"),
    k("train.lora.targets", "list", "linear layers adapted by name (q_proj, v_proj, fc1, linear_1, …) or all-linear (default q_proj, v_proj)"),
    k("train.lora.modules", "list", "modules whose layers get adapters, their weights frozen: any of vision, projector, llm (default llm); the rest of train.trainable trains fully"),
    k("train.rollout.lambda", "float", "train.rollout (a table: on-policy answers; gkd, minillm and rl have one): probability λ that the student answers a micro-batch itself (gkd 0.5, minillm and rl 1)"),
    k("train.rollout.temperature", "float", "sampling temperature of the student's answers (gkd 0.9, minillm and rl 1; 0: greedy)"),
    k("train.rollout.top_p", "float", "nucleus cut of the sampling (1: none)"),
    k("train.rollout.top_k", "integer", "keep the k most likely tokens when sampling (0: all)"),
    k("train.rollout.max_new_tokens", "integer", "answers are cut at this many tokens, and counted (64; the shapes presets 32)"),
    k("train.rollout.mix_alpha", "float", "teacher-mixed sampling: draw from α·teacher + (1−α)·student with importance weights (minillm 0.2, else 0)"),
    k("train.rollout.reward", "string", "what the policy-gradient terms maximise: minillm (log p − log q), task (exact match with the data's answer) or teacher (LLMR)"),
    k("train.rollout.kl_coef", "float", "β_KL: a task or teacher reward minus β_KL·Σ (log q − log p) (0)"),
    k("train.rollout.seq_kd", "bool", "the micro-batches the student does not answer take the teacher's greedy answers (sequence-level KD)"),
    k("train.rollout.log_every", "integer", "write the step's answers to rollouts.jsonl every N steps (10; 0: never)"),
    k("train.objective", "list of tables", "the stage's loss, [[stages.<stage>.objective]]: term, weight, name, divergence, temperature, t2_scaling (see the README)"),
    // [distill]
    k("distill.divergence", "string or table", "forward_kl, reverse_kl, tvd, { kind = \"jsd\", beta }, { kind = \"skew_forward_kl\" | \"skew_reverse_kl\", alpha }"),
    k("distill.temperature", "float", "softmax temperature of the distribution terms"),
    k("distill.t2_scaling", "bool", "multiply the distribution terms by T²"),
    k("distill.alpha_res", "float", "weight of mdist.response (L_res) in the built-in dpt/dft objective"),
    k("distill.beta_vis", "float", "weight of mdist.visual (L_vis) in the built-in objective"),
    k("distill.gamma_rel", "float", "weight of rdist (L_rel) in the built-in objective"),
    // [models.teacher], [models.student]
    k("models.<role>.vision", "string", "vision checkpoint (SigLIP/CLIP, or a LLaVA checkpoint's tower): directory or hub id"),
    k("models.<role>.llm", "string", "causal-LM checkpoint (Qwen2/Llama): directory or hub id"),
    k("models.<role>.vision_config", "table", "a fresh tower (Hugging Face SiglipVisionConfig / CLIPVisionConfig keys)"),
    k("models.<role>.text_config", "table", "a fresh LLM (Hugging Face Qwen2Config / LlamaConfig / Qwen2MoeConfig / MixtralConfig keys)"),
    k("models.<role>.projector", "string", "projector kind (mlp2x_gelu, linear, ...)"),
    k("models.<role>.feature_layer", "integer or list", "vision layer(s) LLaVA reads (-2: the second to last)"),
    k("models.<role>.select_strategy", "string", "default (drop the class token) or full"),
    k("models.<role>.image_token", "string", "the image placeholder token"),
    k("models.<role>.seed", "integer", "seed of a fresh model's weights (--init-seed)"),
    k("models.<role>.image_mean", "list of 3 floats", "per-channel mean of a fresh model's image processor"),
    k("models.<role>.image_std", "list of 3 floats", "per-channel std of a fresh model's image processor"),
    // [tower]: `mmkd tower` (and the demo's vision pre-training)
    k("tower.objective", "string", "labels (the shapes world's per-cell ground truth) or contrastive (SigLIP's sigmoid loss on captions; --objective)"),
    k("tower.epochs", "integer", "passes over the data (the demo: demo.tower_epochs)"),
    k("tower.max_steps", "integer", "stop after N steps (--max-steps)"),
    k("tower.lr", "float", "AdamW's learning rate, constant"),
    k("tower.batch_size", "integer", "images per step (and per contrastive batch: its negatives)"),
    k("tower.feature_rms", "float", "RMS per element of the selected features after the final rescaling"),
    k("tower.seed", "integer", "seed of the data order (--seed); the tower's weights: models.<role>.seed"),
    k("tower.save_every", "integer", "resumable checkpoint every N steps (0: none; --save-every)"),
    k("tower.keep_last", "integer", "checkpoints kept"),
    k("tower.init_logit_scale", "float", "SigLIP's initial log-scale t' (the scale is exp t'; default ln 10)"),
    k("tower.init_logit_bias", "float", "SigLIP's initial logit bias b (default -10)"),
    k("tower.text.hidden_size", "integer", "width of the contrastive objective's text encoder (a small Qwen2 decoder)"),
    k("tower.text.intermediate_size", "integer", "its MLP width"),
    k("tower.text.num_hidden_layers", "integer", "its layers"),
    k("tower.text.num_attention_heads", "integer", "its attention heads"),
    k("tower.text.embed_dim", "integer", "width of the shared image-text embedding space"),
    k("tower.text.max_length", "integer", "caption tokens kept (longer captions are cut and counted)"),
];

/// The value of a documented key (`train.lr`, `models.<role>.seed` or `models.student.seed`,
/// `train.objective`) in a resolved stage's JSON (`StageSettings::as_json`); `Null` when unset.
pub fn value_of<'j>(json: &'j serde_json::Value, key: &str) -> &'j serde_json::Value {
    if key == "train.objective" {
        return &json["objective"];
    }
    let (section, rest) = key.split_once('.').unwrap_or((key, ""));
    let (section, rest) = match section {
        // `models.<role>.field`: the stage's own model is `model`.
        "models" => (
            "model",
            rest.split_once('.').map_or(rest, |(_, field)| field),
        ),
        _ => (section, rest),
    };
    rest.split('.')
        .fold(&json[section], |value, part| &value[part])
}

/// `TITLE settings (not defaults):` and a line `key = value  (source)` for each key of
/// `sources` that is not a default, its value from the resolved settings' `json`.
pub fn describe_sources<'a>(
    title: &str,
    json: &serde_json::Value,
    sources: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> String {
    let mut out = format!("{title} settings (not defaults):\n");
    for (key, source) in sources.into_iter().filter(|(_, s)| *s != "default") {
        out.push_str(&format!("  {key} = {}  ({source})\n", value_of(json, key)));
    }
    out
}

/// The table as `mmkd config keys` prints it, with each key's value for a stage (`defaults`:
/// `section.key` → value, from the resolved settings).
pub fn markdown(defaults: &std::collections::BTreeMap<String, String>) -> String {
    let mut out = String::from("| key | type | value | meaning |\n| --- | --- | --- | --- |\n");
    for key in KEYS {
        let default = defaults.get(key.key).cloned().unwrap_or_else(|| "—".into());
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            key.key, key.kind, default, key.meaning
        ));
    }
    out
}

/// Where each documented key of a stage's settings came from: `--set`, a table of the preset
/// (`name [stages.sft]`, the role tables included), the stage's built-in default, or the
/// settings' default. Keys are those of [`KEYS`], with `models.<role>` spelled out.
pub fn provenance(
    doc: &super::Document,
    stage: super::Stage,
    role: super::Role,
) -> std::collections::BTreeMap<String, String> {
    use toml::Value;
    let preset = doc.origin.first().cloned().unwrap_or_default();
    let table_has = |path: &[&str]| -> bool {
        let mut cursor = &doc.table;
        for (i, part) in path.iter().enumerate() {
            match cursor.get(*part) {
                Some(Value::Table(t)) if i + 1 < path.len() => cursor = t,
                Some(_) if i + 1 == path.len() => return true,
                _ => return false,
            }
        }
        false
    };
    let set_by_override = |paths: &[String]| -> bool {
        doc.overrides.iter().any(|o| {
            let path = o.split_once('=').map_or(o.as_str(), |(p, _)| p).trim();
            paths.iter().any(|p| p == path)
        })
    };
    let (s, r) = (stage.name(), role.name());
    let mut out = std::collections::BTreeMap::new();
    for key in KEYS {
        let (section, rest) = key.key.split_once('.').unwrap_or((key.key, ""));
        let source = match section {
            "train" => {
                let parts: Vec<&str> = rest.split('.').collect();
                let layers: [(Vec<&str>, String); 4] = [
                    ([r, "stages", s].to_vec(), format!("[{r}.stages.{s}]")),
                    ([r, "train"].to_vec(), format!("[{r}.train]")),
                    (["stages", s].to_vec(), format!("[stages.{s}]")),
                    (["train"].to_vec(), "[train]".to_string()),
                ];
                let overrides = [
                    format!("train.{rest}"),
                    format!("stages.{s}.{rest}"),
                    format!("{r}.train.{rest}"),
                    format!("{r}.stages.{s}.{rest}"),
                ];
                if set_by_override(&overrides) {
                    "--set".to_string()
                } else if let Some((_, name)) = layers.iter().find(|(prefix, _)| {
                    let mut path = prefix.clone();
                    path.extend(&parts);
                    table_has(&path)
                }) {
                    format!("{preset} {name}")
                } else if rest == "lr" {
                    format!("stage default ({s})")
                } else {
                    "default".to_string()
                }
            }
            "models" => {
                let field = rest.strip_prefix("<role>.").unwrap_or(rest);
                if set_by_override(&[format!("models.{r}.{field}")]) {
                    "--set".to_string()
                } else if table_has(&["models", r, field]) {
                    format!("{preset} [models.{r}]")
                } else {
                    "default".to_string()
                }
            }
            section => {
                let mut path = vec![section];
                path.extend(rest.split('.'));
                if set_by_override(&[key.key.to_string()]) {
                    "--set".to_string()
                } else if table_has(&path) {
                    format!("{preset} [{}]", path[..path.len() - 1].join("."))
                } else {
                    "default".to_string()
                }
            }
        };
        let name = key.key.replace("<role>", r);
        out.insert(name, source);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load_document, Role, Stage, StageSettings};

    /// Every `section.key` (and `train.schedule.key`) a resolved stage serialises.
    fn field_keys() -> std::collections::BTreeSet<String> {
        let doc = load_document("shapes-tiny").unwrap();
        let settings = StageSettings::resolve(&doc, Stage::Dft, Role::Student).unwrap();
        let json = settings.as_json();
        let mut keys = std::collections::BTreeSet::new();
        for (section, prefix) in [
            ("data", "data"),
            ("train", "train"),
            ("distill", "distill"),
            ("model", "models.<role>"),
        ] {
            for (key, value) in json[section].as_object().unwrap() {
                if section == "train" && key == "schedule" {
                    for sub in value.as_object().unwrap().keys() {
                        keys.insert(format!("train.schedule.{sub}"));
                    }
                } else if section == "train" && key == "lora" {
                    let lora =
                        serde_json::to_value(crate::config::LoraSettings::default()).unwrap();
                    for sub in lora.as_object().unwrap().keys() {
                        keys.insert(format!("train.lora.{sub}"));
                    }
                    // DFT rolls nothing out; the on-policy stages' table has these keys.
                    let rollout =
                        serde_json::to_value(crate::config::settings::RolloutSettings::default())
                            .unwrap();
                    for sub in rollout.as_object().unwrap().keys() {
                        keys.insert(format!("train.rollout.{sub}"));
                    }
                } else {
                    keys.insert(format!("{prefix}.{key}"));
                }
            }
        }
        // The objective is resolved next to the train settings.
        keys.insert("train.objective".into());
        // `[tower]` is resolved on its own (`mmkd tower`).
        let tower = crate::config::tower::TowerSettings::default().as_json();
        for (key, value) in tower.as_object().unwrap() {
            match value.as_object() {
                Some(table) => keys.extend(table.keys().map(|sub| format!("tower.{key}.{sub}"))),
                None => {
                    keys.insert(format!("tower.{key}"));
                }
            }
        }
        keys
    }

    #[test]
    fn each_key_names_the_layer_it_came_from() {
        let mut doc = load_document("shapes-small").unwrap();
        doc.set("stages.sft.batch_size=3").unwrap();
        doc.set("distill.temperature=2.0").unwrap();
        let from = provenance(&doc, Stage::Sft, Role::Teacher);
        assert_eq!(
            from["train.lr"],
            "preset `shapes-small` [teacher.stages.sft]"
        );
        assert_eq!(from["train.batch_size"], "--set");
        assert_eq!(from["distill.temperature"], "--set");
        assert_eq!(from["data.chat_template"], "preset `shapes-small` [data]");
        assert_eq!(
            from["models.teacher.seed"],
            "preset `shapes-small` [models.teacher]"
        );
        assert_eq!(from["train.validate_every"], "default");
        assert_eq!(from["tower.objective"], "preset `shapes-small` [tower]");
        assert_eq!(
            from["tower.text.embed_dim"],
            "preset `shapes-small` [tower.text]"
        );
        assert_eq!(from["tower.init_logit_bias"], "default");
        let student = provenance(
            &load_document("shapes-small").unwrap(),
            Stage::Dft,
            Role::Student,
        );
        assert!(
            student["train.lr"].starts_with("preset `shapes-small` [stages.dft]"),
            "{}",
            student["train.lr"]
        );
        let bare = provenance(
            &load_document("shapes-tiny").unwrap(),
            Stage::Dpt,
            Role::Student,
        );
        assert_eq!(bare["train.max_grad_norm"], "preset `shapes-tiny` [train]");
    }

    #[test]
    fn every_setting_is_documented_and_every_documented_key_exists() {
        let fields = field_keys();
        let documented: std::collections::BTreeSet<String> =
            KEYS.iter().map(|k| k.key.to_string()).collect();
        let missing: Vec<_> = fields.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&fields).collect();
        assert!(
            missing.is_empty(),
            "settings without a line in KEYS: {missing:?}"
        );
        assert!(stale.is_empty(), "KEYS lines for no setting: {stale:?}");
        assert!(KEYS
            .iter()
            .all(|k| !k.meaning.is_empty() && !k.kind.is_empty()));
    }
}
