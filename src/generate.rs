//! Batched generation with a KV cache: greedy, or temperature / top-k / top-p sampling from a
//! seeded RNG; stop tokens and stop strings; a token budget.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use mmkd_nn::SeededRng;

use crate::models::llava::{LlavaModel, TokenBatch};

#[derive(Clone, Debug)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 → greedy.
    pub temperature: f32,
    /// Nucleus threshold in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    pub seed: u64,
    pub stop_token_ids: Vec<u32>,
    /// Generation of a sequence stops once its decoded text contains one of these (the string
    /// itself is cut from the returned text by the caller that decodes).
    pub stop_strings: Vec<String>,
    /// Whether to reuse keys/values between steps (always true outside equivalence tests).
    pub use_cache: bool,
    /// Tokens never generated (training rollouts ban the image token: it stands for image
    /// features, which a generated one would not have).
    pub banned_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            use_cache: true,
            banned_token_ids: Vec::new(),
        }
    }
}

/// Left-pads prompts (so every row's next token comes at the same column), with position ids
/// counting real tokens only.
fn left_padded(prompts: &[Vec<u32>], pad_id: u32) -> (TokenBatch, Vec<Vec<u32>>) {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut positions = Vec::new();
    for p in prompts {
        let pad = len - p.len();
        let mut row = vec![pad_id; pad];
        row.extend_from_slice(p);
        ids.push(row);
        mask.push((0..len).map(|t| u8::from(t >= pad)).collect());
        positions.push((0..len).map(|t| t.saturating_sub(pad) as u32).collect());
    }
    (TokenBatch { ids, mask }, positions)
}

/// Generates continuations of `prompts` (token ids with image blocks already expanded);
/// `pixel_values` holds the batch's images in prompt order. Returns only the new tokens,
/// without the stop token.
pub fn generate(
    model: &LlavaModel,
    prompts: &[Vec<u32>],
    pixel_values: Option<&Tensor>,
    cfg: &GenerationConfig,
    decode: &dyn Fn(&[u32]) -> String,
) -> Result<Vec<Vec<u32>>> {
    let mut rng = SeededRng::new(cfg.seed);
    let mut decoder = Decoder::new(model, prompts, pixel_values, cfg.use_cache)?;
    run_loop(
        &mut [&mut decoder],
        prompts.len(),
        cfg,
        decode,
        &mut |logits| pick_tokens(&logits[0], cfg, &mut rng),
    )
}

/// A generated continuation with the model's log-probability (temperature 1) of each token.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredOutput {
    /// The new tokens, without the stop token.
    pub ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    /// Generation ended on a stop token or string (not at `max_new_tokens`).
    pub stopped: bool,
}

/// [`generate`], also reporting each chosen token's log-probability under the model (what a
/// teacher writing data is filtered by) and whether the row stopped by itself. Row r samples
/// from its own generator seeded by `row_seeds[r]`, so its tokens do not depend on the batch it
/// is in: they are what [`generate`] gives for that prompt alone with `seed = row_seeds[r]`.
pub fn generate_scored(
    model: &LlavaModel,
    prompts: &[Vec<u32>],
    pixel_values: Option<&Tensor>,
    cfg: &GenerationConfig,
    row_seeds: &[u64],
    decode: &dyn Fn(&[u32]) -> String,
) -> Result<Vec<ScoredOutput>> {
    ensure!(
        row_seeds.len() == prompts.len(),
        "{} seeds for {} prompts",
        row_seeds.len(),
        prompts.len()
    );
    let mut rngs: Vec<SeededRng> = row_seeds.iter().map(|&s| SeededRng::new(s)).collect();
    let mut decoder = Decoder::new(model, prompts, pixel_values, cfg.use_cache)?;
    let mut steps: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let ids = run_loop(
        &mut [&mut decoder],
        prompts.len(),
        cfg,
        decode,
        &mut |logits| {
            let next = if cfg.temperature <= 0.0 {
                pick_tokens(&logits[0], cfg, &mut rngs[0])?
            } else {
                to_rows(&logits[0])?
                    .iter()
                    .zip(rngs.iter_mut())
                    .map(|(row, rng)| sample_row(row, cfg, rng))
                    .collect()
            };
            let logp = crate::distill::log_softmax(&logits[0].to_dtype(DType::F32)?)?;
            for (row, (&tok, lp)) in next.iter().zip(to_rows(&logp)?).enumerate() {
                steps[row].push(lp[tok as usize]);
            }
            Ok(next)
        },
    )?;
    Ok(ids
        .into_iter()
        .zip(steps)
        .map(|(ids, mut logprobs)| {
            // A row's steps after it finished are not its tokens; the step that chose its
            // stop token (if any) is the one after its last token.
            let stopped = logprobs.len() > ids.len()
                || (!cfg.stop_strings.is_empty()
                    && cfg
                        .stop_strings
                        .iter()
                        .any(|s| decode(&ids).contains(s.as_str())));
            logprobs.truncate(ids.len());
            ScoredOutput {
                ids,
                logprobs,
                stopped,
            }
        })
        .collect())
}

/// Teacher-mixed sampling (MiniLLM, Gu et al. 2024, §2.2): each token is drawn from
/// p̃ = α·p + (1−α)·q, the teacher's and the student's next-token distributions at the
/// configuration's temperature (top-k / top-p then cut the mixture). Both models read the same
/// prompts and images (`teacher_pixels` preprocessed for the teacher).
pub fn generate_mixed(
    student: &LlavaModel,
    teacher: &LlavaModel,
    alpha: f32,
    prompts: &[Vec<u32>],
    pixels: (Option<&Tensor>, Option<&Tensor>),
    cfg: &GenerationConfig,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        (0.0..=1.0).contains(&alpha),
        "the teacher's share of the sampling mixture must be in [0, 1], got {alpha}"
    );
    ensure!(
        cfg.temperature > 0.0,
        "teacher-mixed sampling samples: the temperature must be positive"
    );
    let mut rng = SeededRng::new(cfg.seed);
    let mut q = Decoder::new(student, prompts, pixels.0, cfg.use_cache)?;
    let mut p = Decoder::new(teacher, prompts, pixels.1, cfg.use_cache)?;
    run_loop(
        &mut [&mut q, &mut p],
        prompts.len(),
        cfg,
        &|_| String::new(),
        &mut |logits| {
            let (q, p) = (to_rows(&logits[0])?, to_rows(&logits[1])?);
            Ok(q.iter()
                .zip(&p)
                .map(|(q, p)| {
                    let vocab = q.len().min(p.len());
                    let (q, p) = (
                        softmax(&q[..vocab], cfg.temperature),
                        softmax(&p[..vocab], cfg.temperature),
                    );
                    let mixed: Vec<f32> = q
                        .iter()
                        .zip(&p)
                        .map(|(q, p)| alpha * p + (1.0 - alpha) * q)
                        .collect();
                    sample_probs(mixed, cfg, &mut rng)
                })
                .collect())
        },
    )
}

/// The decoding loop shared by one model and a mixture: `pick` chooses each row's next token
/// from every decoder's last logits; all decoders are fed the same tokens.
fn run_loop(
    decoders: &mut [&mut Decoder<'_>],
    rows: usize,
    cfg: &GenerationConfig,
    decode: &dyn Fn(&[u32]) -> String,
    pick: &mut dyn FnMut(&[Tensor]) -> Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>> {
    let mut outputs: Vec<Vec<u32>> = vec![Vec::new(); rows];
    let mut done = vec![false; rows];
    for _ in 0..cfg.max_new_tokens {
        let logits = decoders
            .iter()
            .map(|d| without_banned(&d.last_logits, &cfg.banned_token_ids))
            .collect::<Result<Vec<_>>>()?;
        let next = pick(&logits)?;
        for (row, &tok) in next.iter().enumerate() {
            if done[row] {
                continue;
            }
            if cfg.stop_token_ids.contains(&tok) {
                done[row] = true;
                continue;
            }
            outputs[row].push(tok);
            if !cfg.stop_strings.is_empty() {
                let text = decode(&outputs[row]);
                if cfg.stop_strings.iter().any(|s| text.contains(s.as_str())) {
                    done[row] = true;
                }
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        for d in decoders.iter_mut() {
            d.feed(&next)?;
        }
    }
    Ok(outputs)
}

/// One model decoding a left-padded batch, with or without a KV cache.
struct Decoder<'m> {
    model: &'m LlavaModel,
    cache: Option<crate::models::decoder::KvCache>,
    key_mask: Vec<Vec<u8>>,
    all_positions: Vec<Vec<u32>>,
    next_pos: Vec<u32>,
    /// Every embedding so far (only kept without a cache).
    all_embeds: Tensor,
    /// `[batch, vocab]` logits of the next token.
    last_logits: Tensor,
}

impl<'m> Decoder<'m> {
    /// Reads the prompts (the prefill).
    fn new(
        model: &'m LlavaModel,
        prompts: &[Vec<u32>],
        pixel_values: Option<&Tensor>,
        use_cache: bool,
    ) -> Result<Self> {
        ensure!(!prompts.is_empty(), "nothing to generate from: no prompts");
        ensure!(prompts.iter().all(|p| !p.is_empty()), "empty prompt");
        let device = model.device();
        let (batch, positions) = left_padded(prompts, 0);
        let next_pos = positions
            .iter()
            .map(|p| p.last().copied().unwrap_or(0) + 1)
            .collect();
        let (prompt_embeds, _) = model.embed(&batch, pixel_values)?;
        let prompt_embeds = prompt_embeds.detach();
        let mut cache = use_cache.then(|| model.new_cache());
        let pos = to_positions(&positions, device)?;
        let hidden = model
            .lm
            .forward_hidden(&prompt_embeds, &batch.mask, &pos, cache.as_mut())?;
        let last_logits = model
            .lm
            .logits(&hidden.narrow(1, hidden.dim(1)? - 1, 1)?)?
            .squeeze(1)?;
        Ok(Self {
            model,
            cache,
            key_mask: batch.mask,
            all_positions: positions,
            next_pos,
            all_embeds: prompt_embeds,
            last_logits,
        })
    }

    /// Appends one token per row and computes the next logits.
    fn feed(&mut self, next: &[u32]) -> Result<()> {
        let model = self.model;
        let device = model.device();
        let ids = Tensor::from_vec(next.to_vec(), (next.len(), 1), device)?;
        let step_embeds = model.lm.embed(&ids)?;
        for (row, mask) in self.key_mask.iter_mut().enumerate() {
            mask.push(1);
            self.all_positions[row].push(self.next_pos[row]);
            self.next_pos[row] += 1;
        }
        let hidden = match self.cache.as_mut() {
            Some(cache) => {
                let step_pos: Vec<Vec<u32>> = self
                    .all_positions
                    .iter()
                    .map(|p| vec![*p.last().unwrap_or(&0)])
                    .collect();
                model.lm.forward_hidden(
                    &step_embeds,
                    &self.key_mask,
                    &to_positions(&step_pos, device)?,
                    Some(cache),
                )?
            }
            None => {
                self.all_embeds = Tensor::cat(&[&self.all_embeds, &step_embeds], 1)?;
                model.lm.forward_hidden(
                    &self.all_embeds,
                    &self.key_mask,
                    &to_positions(&self.all_positions, device)?,
                    None,
                )?
            }
        };
        self.last_logits = model
            .lm
            .logits(&hidden.narrow(1, hidden.dim(1)? - 1, 1)?)?
            .squeeze(1)?;
        Ok(())
    }
}

fn to_positions(rows: &[Vec<u32>], device: &candle_core::Device) -> Result<Tensor> {
    let s = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), s), device)?)
}

/// One token per row from `[b, vocab]` logits.
fn pick_tokens(logits: &Tensor, cfg: &GenerationConfig, rng: &mut SeededRng) -> Result<Vec<u32>> {
    if cfg.temperature <= 0.0 {
        return Ok(logits
            .argmax(D::Minus1)?
            .to_dtype(DType::U32)?
            .to_vec1::<u32>()?);
    }
    Ok(to_rows(logits)?
        .iter()
        .map(|row| sample_row(row, cfg, rng))
        .collect())
}

/// `[b, vocab]` logits with the banned tokens at −∞.
fn without_banned(logits: &Tensor, banned: &[u32]) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    if banned.iter().all(|&t| t as usize >= vocab) {
        return Ok(logits.clone());
    }
    let mut mask = vec![0f32; vocab];
    for &t in banned.iter().filter(|&&t| (t as usize) < vocab) {
        mask[t as usize] = f32::NEG_INFINITY;
    }
    let mask = Tensor::from_vec(mask, vocab, logits.device())?.to_dtype(logits.dtype())?;
    Ok(logits.broadcast_add(&mask)?)
}

fn to_rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(logits.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

/// softmax(logits / temperature).
fn softmax(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let total: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / total).collect()
}

fn sample_row(logits: &[f32], cfg: &GenerationConfig, rng: &mut SeededRng) -> u32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let weights = logits
        .iter()
        .map(|&l| ((l - max) / cfg.temperature).exp())
        .collect();
    sample_probs(weights, cfg, rng)
}

/// A token drawn from unnormalised `weights` after the top-k and top-p cuts.
fn sample_probs(weights: Vec<f32>, cfg: &GenerationConfig, rng: &mut SeededRng) -> u32 {
    let mut probs: Vec<(u32, f32)> = weights
        .into_iter()
        .enumerate()
        .map(|(i, w)| (i as u32, w))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 {
        probs.truncate(cfg.top_k);
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if cfg.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = 0;
        for (_, p) in &probs {
            keep += 1;
            cumulative += p / total;
            if cumulative >= cfg.top_p {
                break;
            }
        }
        probs.truncate(keep.max(1));
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() * total;
    for (id, p) in &probs {
        if u < *p {
            return *id;
        }
        u -= p;
    }
    probs.last().map(|p| p.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_respects_top_k_and_is_seeded() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let cfg = GenerationConfig {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let mut a = SeededRng::new(1);
        let mut b = SeededRng::new(1);
        let xs: Vec<u32> = (0..50).map(|_| sample_row(&logits, &cfg, &mut a)).collect();
        let ys: Vec<u32> = (0..50).map(|_| sample_row(&logits, &cfg, &mut b)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&t| t == 1 || t == 2));
        assert!(xs.contains(&1) && xs.contains(&2));
        let nucleus = GenerationConfig {
            temperature: 1.0,
            top_p: 0.1,
            ..Default::default()
        };
        assert!((0..20).all(|_| sample_row(&logits, &nucleus, &mut a) == 1));
    }

    #[test]
    fn left_padding_counts_positions_from_the_first_real_token() {
        let (batch, pos) = left_padded(&[vec![7, 8, 9], vec![5]], 0);
        assert_eq!(batch.ids, vec![vec![7, 8, 9], vec![0, 0, 5]]);
        assert_eq!(batch.mask, vec![vec![1, 1, 1], vec![0, 0, 1]]);
        assert_eq!(pos, vec![vec![0, 1, 2], vec![0, 0, 0]]);
    }
}
