//! Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a distilled student as
//! the draft: the draft proposes γ tokens one by one, the target scores all of them in one
//! forward, and the proposals are kept up to the first the target would not have chosen; the
//! target's own choice there (or, when all γ are kept, its next token) follows. With greedy
//! choice on both sides the output is exactly the target's greedy output — only the number of
//! target forwards changes — so the acceptance rate measures how closely the student follows its
//! teacher. Both models keep a KV cache, cut back to the kept tokens after each round.
//!
//! This is the greedy rule; sampling (accept with min(1, p/q), resample from norm(max(0, p − q)))
//! is not implemented yet.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

use crate::generate::GenerationConfig;
use crate::models::decoder::KvCache;
use crate::models::llava::{LlavaModel, TokenBatch};

/// What a speculative generation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpeculativeStats {
    /// Draft–verify rounds.
    pub rounds: usize,
    /// Tokens the draft proposed.
    pub proposed: usize,
    /// Proposals the target kept.
    pub accepted: usize,
    /// Target forward passes (the prompt's included).
    pub target_forwards: usize,
}

impl SpeculativeStats {
    /// Kept proposals over proposals (0 when nothing was proposed).
    pub fn acceptance_rate(&self) -> f64 {
        if self.proposed == 0 {
            0.0
        } else {
            self.accepted as f64 / self.proposed as f64
        }
    }
}

/// One model's side: its cache and the logits of its last forward.
struct Side<'a> {
    model: &'a LlavaModel,
    cache: KvCache,
}

impl<'a> Side<'a> {
    /// The prompt (with its images) through the model; the logits `[vocab]` after it.
    fn prefill(
        model: &'a LlavaModel,
        prompt: &[u32],
        pixel_values: Option<&Tensor>,
    ) -> Result<(Self, Tensor)> {
        let batch = TokenBatch {
            ids: vec![prompt.to_vec()],
            mask: vec![vec![1; prompt.len()]],
        };
        let (embeds, _) = model.embed(&batch, pixel_values)?;
        let mut side = Self {
            model,
            cache: model.new_cache(),
        };
        let logits = side.run(&embeds.detach(), prompt.len())?;
        let last = logits.get(logits.dim(0)? - 1)?;
        Ok((side, last))
    }

    /// Feeds `tokens` after what the cache holds; the logits `[tokens, vocab]` at each.
    fn feed(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let ids = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), self.model.device())?;
        let embeds = self.model.lm.embed(&ids)?;
        self.run(&embeds, tokens.len())
    }

    fn run(&mut self, embeds: &Tensor, n: usize) -> Result<Tensor> {
        let start = self.cache.len();
        let positions: Vec<u32> = (start..start + n).map(|p| p as u32).collect();
        let positions = Tensor::from_vec(positions, (1, n), self.model.device())?;
        let key_mask = vec![vec![1u8; start + n]];
        let hidden =
            self.model
                .lm
                .forward_hidden(embeds, &key_mask, &positions, Some(&mut self.cache))?;
        Ok(self.model.lm.logits(&hidden)?.squeeze(0)?)
    }
}

fn argmax(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits
        .argmax(D::Minus1)?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?)
}

/// The images of a prompt as each model preprocesses them.
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptImages<'a> {
    pub target: Option<&'a Tensor>,
    pub draft: Option<&'a Tensor>,
}

/// Greedy speculative generation of a continuation of one `prompt` (image blocks expanded):
/// `target`'s greedy output, `draft` proposing `gamma` tokens a round. Stops as
/// [`crate::generate::generate`] does (stop tokens, stop strings, `max_new_tokens`).
#[allow(clippy::too_many_arguments)]
pub fn speculative_generate(
    target: &LlavaModel,
    draft: &LlavaModel,
    prompt: &[u32],
    images: PromptImages<'_>,
    cfg: &GenerationConfig,
    gamma: usize,
    decode: &dyn Fn(&[u32]) -> String,
) -> Result<(Vec<u32>, SpeculativeStats)> {
    ensure!(!prompt.is_empty(), "empty prompt");
    ensure!(
        gamma >= 1,
        "the draft must propose at least one token a round"
    );
    ensure!(
        cfg.temperature <= 0.0,
        "speculative decoding is greedy only for now: use temperature 0"
    );
    let (tv, dv) = (
        target.config.text_config.vocab_size,
        draft.config.text_config.vocab_size,
    );
    ensure!(
        tv == dv && target.image_token_id() == draft.image_token_id(),
        "the draft must share the target's vocabulary and image token (vocabulary {dv} vs \
         {tv}, image token {} vs {})",
        draft.image_token_id(),
        target.image_token_id()
    );
    let (mut t, t_last) = Side::prefill(target, prompt, images.target)?;
    let (mut d, _) = Side::prefill(draft, prompt, images.draft)?;
    let mut stats = SpeculativeStats {
        target_forwards: 1,
        ..Default::default()
    };
    let mut seq = prompt.to_vec();
    let mut out: Vec<u32> = Vec::new();
    // Emits `tok`; false once generation is over.
    let emit = |tok: u32, seq: &mut Vec<u32>, out: &mut Vec<u32>| -> bool {
        if cfg.stop_token_ids.contains(&tok) {
            return false;
        }
        out.push(tok);
        seq.push(tok);
        if !cfg.stop_strings.is_empty() {
            let text = decode(out);
            if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                return false;
            }
        }
        out.len() < cfg.max_new_tokens
    };
    if cfg.max_new_tokens == 0 {
        return Ok((out, stats));
    }
    let mut next = argmax(&t_last)?[0];
    'rounds: loop {
        if !emit(next, &mut seq, &mut out) {
            break;
        }
        // The draft catches up with what was kept, then proposes γ tokens.
        let missing = seq[d.cache.len()..].to_vec();
        let mut proposal = vec![*argmax(&d.feed(&missing)?)?.last().expect("fed tokens")];
        while proposal.len() < gamma {
            let last = *proposal.last().expect("non-empty");
            proposal.push(argmax(&d.feed(&[last])?)?[0]);
        }
        // The target scores the last kept token and every proposal in one forward: row i
        // predicts the token after position i.
        let mut fed = seq[t.cache.len()..].to_vec();
        let first = fed.len() - 1;
        fed.extend_from_slice(&proposal);
        let choices = argmax(&t.feed(&fed)?)?;
        stats.target_forwards += 1;
        stats.rounds += 1;
        stats.proposed += gamma;
        let kept = proposal
            .iter()
            .zip(&choices[first..])
            .take_while(|(p, c)| p == c)
            .count();
        stats.accepted += kept;
        for &tok in &proposal[..kept] {
            if !emit(tok, &mut seq, &mut out) {
                break 'rounds;
            }
        }
        next = choices[first + kept];
        // Both caches keep only what was kept (the target's next token is fed next round).
        t.cache.truncate(seq.len())?;
        d.cache.truncate(seq.len().min(d.cache.len()))?;
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::data::BenchBatch;
    use crate::bench::step::build;
    use crate::bench::tests::tiny_spec;
    use crate::generate::generate;
    use crate::models::llava::Trainable;
    use candle_core::Device;

    /// The same images for both models.
    fn both(pixels: &Tensor) -> PromptImages<'_> {
        PromptImages {
            target: Some(pixels),
            draft: Some(pixels),
        }
    }

    #[test]
    fn greedy_speculation_gives_exactly_the_targets_greedy_output() {
        let spec = tiny_spec();
        let target = build(&spec, &spec.teacher, Trainable::NONE, 11, None).unwrap();
        let draft = build(&spec, &spec.student, Trainable::NONE, 12, None).unwrap();
        let batch = BenchBatch::random(&spec, 5, &Device::Cpu).unwrap();
        let prompt_len = spec.seq_len() - spec.response_tokens;
        let decode = |_: &[u32]| String::new();
        for row in 0..2 {
            let prompt = batch.tokens.ids[row][..prompt_len].to_vec();
            let pixels = batch.pixels.narrow(0, row, 1).unwrap();
            for (max_new, stop) in [(24, vec![]), (24, vec![7u32, 19]), (5, vec![])] {
                let cfg = GenerationConfig {
                    max_new_tokens: max_new,
                    stop_token_ids: stop.clone(),
                    ..Default::default()
                };
                let alone = generate(
                    &target,
                    std::slice::from_ref(&prompt),
                    Some(&pixels),
                    &cfg,
                    &decode,
                )
                .unwrap()
                .remove(0);
                for gamma in [1, 3, 6] {
                    let (out, stats) = speculative_generate(
                        &target,
                        &draft,
                        &prompt,
                        both(&pixels),
                        &cfg,
                        gamma,
                        &decode,
                    )
                    .unwrap();
                    assert_eq!(out, alone, "row {row}, γ {gamma}, stop {stop:?}");
                    assert!(stats.accepted <= stats.proposed);
                    assert_eq!(stats.target_forwards, stats.rounds + 1);
                }
            }
        }
    }

    #[test]
    fn a_draft_that_is_the_target_is_always_accepted() {
        let spec = tiny_spec();
        let target = build(&spec, &spec.teacher, Trainable::NONE, 11, None).unwrap();
        let batch = BenchBatch::random(&spec, 5, &Device::Cpu).unwrap();
        let prompt = batch.tokens.ids[0][..spec.seq_len() - spec.response_tokens].to_vec();
        let pixels = batch.pixels.narrow(0, 0, 1).unwrap();
        let cfg = GenerationConfig {
            max_new_tokens: 21,
            ..Default::default()
        };
        let (out, stats) =
            speculative_generate(&target, &target, &prompt, both(&pixels), &cfg, 4, &|_| {
                String::new()
            })
            .unwrap();
        assert_eq!(out.len(), 21);
        assert_eq!(stats.acceptance_rate(), 1.0);
        // 1 + 5 tokens a round: the prompt's forward and 4 rounds for 21 tokens.
        assert_eq!((stats.rounds, stats.target_forwards), (4, 5));
        let err = speculative_generate(
            &target,
            &target,
            &prompt,
            both(&pixels),
            &GenerationConfig {
                temperature: 0.7,
                ..cfg
            },
            4,
            &|_| String::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("greedy only"), "{err}");
    }
}
