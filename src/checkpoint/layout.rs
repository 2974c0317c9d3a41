//! Weight-name layouts. mmkd names parameters as transformers 5 does in memory, except that the
//! vision tower keeps its `vision_model.` level (as standalone SigLIP/CLIP checkpoints and
//! transformers 4 LLaVA checkpoints have it). Three on-disk layouts are read:
//! - transformers 5 module names: `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`
//!   (no `vision_model.`), `model.multi_modal_projector.*`;
//! - transformers 5 `save_pretrained` default: `language_model.model.*`, `language_model.lm_head.*`,
//!   `vision_tower.*` (no `vision_model.`), `multi_modal_projector.*`;
//! - transformers 4 / Hub checkpoints: as above with `vision_tower.vision_model.*`.
//!
//! Saving writes transformers 5's default `save_pretrained` layout.

use crate::models::llava::{LM_PREFIX, PROJECTOR_PREFIX, VISION_PREFIX};

/// Maps a LLaVA checkpoint key (any of the three layouts) to mmkd's names.
pub fn llava_key(name: &str) -> Option<String> {
    let renamed = if let Some(rest) = name.strip_prefix("language_model.model.") {
        format!("{LM_PREFIX}.{rest}")
    } else if let Some(rest) = name.strip_prefix("language_model.lm_head.") {
        format!("lm_head.{rest}")
    } else if let Some(rest) = name
        .strip_prefix("model.vision_tower.")
        .or_else(|| name.strip_prefix("vision_tower."))
    {
        let rest = rest.strip_prefix("vision_model.").unwrap_or(rest);
        format!("{VISION_PREFIX}.vision_model.{rest}")
    } else if let Some(rest) = name.strip_prefix("multi_modal_projector.") {
        format!("{PROJECTOR_PREFIX}.{rest}")
    } else {
        name.to_string()
    };
    Some(renamed)
}

/// The key mmkd writes for one of its parameters: transformers 5's `save_pretrained` layout.
pub fn saved_key(name: &str) -> String {
    if let Some(rest) = name.strip_prefix(&format!("{LM_PREFIX}.")) {
        format!("language_model.model.{rest}")
    } else if let Some(rest) = name.strip_prefix("lm_head.") {
        format!("language_model.lm_head.{rest}")
    } else if let Some(rest) = name.strip_prefix(&format!("{VISION_PREFIX}.vision_model.")) {
        format!("vision_tower.{rest}")
    } else if let Some(rest) = name.strip_prefix(&format!("{PROJECTOR_PREFIX}.")) {
        format!("multi_modal_projector.{rest}")
    } else {
        name.to_string()
    }
}

/// Maps a standalone vision checkpoint key (`SiglipVisionModel`, `CLIPVisionModel`, or the vision
/// half of a full `SiglipModel`/`CLIPModel`) into the LLaVA layout; text-side keys are dropped.
pub fn vision_key(name: &str) -> Option<String> {
    name.strip_prefix("vision_model.")
        .map(|rest| format!("{VISION_PREFIX}.vision_model.{rest}"))
}

/// Maps a causal-LM checkpoint key (`Qwen2ForCausalLM`, `LlamaForCausalLM`) into the LLaVA layout.
pub fn llm_key(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("model.") {
        Some(format!("{LM_PREFIX}.{rest}"))
    } else if name.starts_with("lm_head.") {
        Some(name.to_string())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_and_component_keys_map_to_the_current_layout() {
        assert_eq!(
            llava_key("language_model.model.layers.0.mlp.up_proj.weight").unwrap(),
            "model.language_model.layers.0.mlp.up_proj.weight"
        );
        assert_eq!(
            llava_key("language_model.lm_head.weight").unwrap(),
            "lm_head.weight"
        );
        for key in [
            "vision_tower.vision_model.post_layernorm.bias",
            "vision_tower.post_layernorm.bias",
            "model.vision_tower.post_layernorm.bias",
            "model.vision_tower.vision_model.post_layernorm.bias",
        ] {
            let ours = llava_key(key).unwrap();
            assert_eq!(ours, "model.vision_tower.vision_model.post_layernorm.bias");
            assert_eq!(saved_key(&ours), "vision_tower.post_layernorm.bias");
        }
        assert_eq!(saved_key("lm_head.weight"), "language_model.lm_head.weight");
        assert_eq!(
            saved_key("model.language_model.norm.weight"),
            "language_model.model.norm.weight"
        );
        assert_eq!(
            llava_key("multi_modal_projector.linear_1.weight").unwrap(),
            "model.multi_modal_projector.linear_1.weight"
        );
        assert_eq!(llava_key("lm_head.weight").unwrap(), "lm_head.weight");
        assert_eq!(
            vision_key("text_model.embeddings.token_embedding.weight"),
            None
        );
        assert_eq!(
            llm_key("model.embed_tokens.weight").unwrap(),
            "model.language_model.embed_tokens.weight"
        );
    }
}
