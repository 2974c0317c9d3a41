//! Speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a distilled student as
//! the draft: the draft proposes γ tokens one by one, the target scores all of them in one
//! forward, and the proposals are kept up to the first the target would not have chosen; the
//! target's own choice there (or, when all γ are kept, its next token) follows. With greedy
//! choice on both sides the output is exactly the target's greedy output — only the number of
//! target forwards changes — so the acceptance rate measures how closely the student follows its
//! teacher. Both models keep a KV cache, cut back to the kept tokens after each round.
//!
//! With sampling (temperature > 0) the draft samples its proposals x ~ q and the target keeps
//! each with probability min(1, p(x)/q(x)); at the first rejection the token is drawn from
//! norm(max(0, p − q)), and after γ kept proposals one more from p: the output has the target's
//! own sampling distribution (Leviathan et al. 2023, Theorem 1). p and q are both models'
//! distributions at the configuration's temperature (top-k / top-p are refused: cutting either
//! distribution differently would break the equality).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use mmkd_nn::SeededRng;

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

impl std::ops::AddAssign for SpeculativeStats {
    fn add_assign(&mut self, other: Self) {
        self.rounds += other.rounds;
        self.proposed += other.proposed;
        self.accepted += other.accepted;
        self.target_forwards += other.target_forwards;
    }
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

/// How tokens are chosen from logits: the argmax, or a draw at a temperature.
enum Chooser {
    Greedy,
    Sample {
        temperature: f32,
        rng: Box<SeededRng>,
    },
}

impl Chooser {
    /// One token per row of `[rows, vocab]` (or `[vocab]`) logits, with each row's
    /// distribution (empty when greedy).
    fn choose(&mut self, logits: &Tensor) -> Result<(Vec<u32>, Vec<Vec<f32>>)> {
        match self {
            Chooser::Greedy => Ok((argmax(logits)?, Vec::new())),
            Chooser::Sample { temperature, rng } => {
                let rows = distributions(logits, *temperature)?;
                let picks = rows.iter().map(|p| draw(p, rng)).collect();
                Ok((picks, rows))
            }
        }
    }
}

/// softmax(logits / temperature) per row.
fn distributions(logits: &Tensor, temperature: f32) -> Result<Vec<Vec<f32>>> {
    let logits = if logits.rank() == 1 {
        logits.unsqueeze(0)?
    } else {
        logits.clone()
    };
    let scaled = (logits.to_dtype(DType::F32)? / f64::from(temperature))?;
    Ok(candle_nn::ops::softmax_last_dim(&scaled)?.to_vec2::<f32>()?)
}

/// A draw from the probabilities `p` (normalised here, so a residual may be passed as is).
fn draw(p: &[f32], rng: &mut SeededRng) -> u32 {
    let total: f32 = p.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, &w) in p.iter().enumerate() {
        if u < w {
            return i as u32;
        }
        u -= w;
    }
    p.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// The speculative-sampling rule for one proposal `x ~ q` against the target's `p`: `None`
/// when it is kept (with probability min(1, p(x)/q(x))), else the replacement drawn from
/// norm(max(0, p − q)).
fn accept_or_resample(p: &[f32], q: &[f32], x: u32, rng: &mut SeededRng) -> Option<u32> {
    let (px, qx) = (p[x as usize], q[x as usize]);
    if qx <= 0.0 || rng.uniform() < (px / qx).min(1.0) {
        return None;
    }
    let residual: Vec<f32> = p.iter().zip(q).map(|(p, q)| (p - q).max(0.0)).collect();
    if residual.iter().sum::<f32>() <= 0.0 {
        // p = q up to rounding: any draw from p is right.
        return Some(draw(p, rng));
    }
    Some(draw(&residual, rng))
}

/// The images of a prompt as each model preprocesses them.
#[derive(Clone, Copy, Debug, Default)]
pub struct PromptImages<'a> {
    pub target: Option<&'a Tensor>,
    pub draft: Option<&'a Tensor>,
}

/// Speculative generation of a continuation of one `prompt` (image blocks expanded), `draft`
/// proposing `gamma` tokens a round: `target`'s greedy output (temperature 0), or a sample of
/// its distribution at `cfg.temperature` drawn with `cfg.seed`. Stops as
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
        cfg.temperature <= 0.0 || (cfg.top_k == 0 && cfg.top_p >= 1.0),
        "speculative sampling draws from the models' full distributions at the temperature: \
         top-k and top-p are not supported"
    );
    let mut chooser = if cfg.temperature > 0.0 {
        Chooser::Sample {
            temperature: cfg.temperature,
            rng: Box::new(SeededRng::new(cfg.seed)),
        }
    } else {
        Chooser::Greedy
    };
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
    let mut next = chooser.choose(&t_last)?.0[0];
    'rounds: loop {
        if !emit(next, &mut seq, &mut out) {
            break;
        }
        // The draft catches up with what was kept, then proposes γ tokens (with the
        // distribution each was drawn from, when sampling).
        let missing = seq[d.cache.len()..].to_vec();
        let logits = d.feed(&missing)?;
        let (picks, mut draft_probs) = chooser.choose(&logits.get(logits.dim(0)? - 1)?)?;
        let mut proposal = picks;
        while proposal.len() < gamma {
            let last = *proposal.last().expect("non-empty");
            let (pick, probs) = chooser.choose(&d.feed(&[last])?)?;
            proposal.extend(pick);
            draft_probs.extend(probs);
        }
        // The target scores the last kept token and every proposal in one forward: row i
        // predicts the token after position i.
        let mut fed = seq[t.cache.len()..].to_vec();
        let first = fed.len() - 1;
        fed.extend_from_slice(&proposal);
        let target_logits = t.feed(&fed)?.narrow(0, first, gamma + 1)?;
        stats.target_forwards += 1;
        stats.rounds += 1;
        stats.proposed += gamma;
        // How many proposals are kept, and the target's token after them.
        let (kept, after) = match &mut chooser {
            Chooser::Greedy => {
                let choices = argmax(&target_logits)?;
                let kept = proposal
                    .iter()
                    .zip(&choices)
                    .take_while(|(p, c)| p == c)
                    .count();
                (kept, choices[kept])
            }
            Chooser::Sample { temperature, rng } => {
                let target_probs = distributions(&target_logits, *temperature)?;
                let mut verdict = None;
                for (i, &x) in proposal.iter().enumerate() {
                    if let Some(replacement) =
                        accept_or_resample(&target_probs[i], &draft_probs[i], x, rng)
                    {
                        verdict = Some((i, replacement));
                        break;
                    }
                }
                verdict.unwrap_or_else(|| (gamma, draw(&target_probs[gamma], rng)))
            }
        };
        stats.accepted += kept;
        for &tok in &proposal[..kept] {
            if !emit(tok, &mut seq, &mut out) {
                break 'rounds;
            }
        }
        next = after;
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
    use crate::bench::spec::{BenchSpec, LmSpec};
    use crate::bench::step::build;
    use crate::bench::tests::tiny_spec;
    use crate::generate::generate;
    use crate::models::llava::Trainable;
    use candle_core::Device;

    /// A frozen model of the bench spec's `lm` on the CPU.
    fn frozen(spec: &BenchSpec, lm: &LmSpec, seed: u64) -> LlavaModel {
        build(spec, lm, Trainable::NONE, seed, None, &Device::Cpu).unwrap()
    }

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
        let target = frozen(&spec, &spec.teacher, 11);
        let draft = frozen(&spec, &spec.student, 12);
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
        let target = frozen(&spec, &spec.teacher, 11);
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
                top_k: 5,
                ..cfg.clone()
            },
            4,
            &|_| String::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("top-k and top-p"), "{err}");
        // Sampling with the target as its own draft keeps every proposal too.
        let sampled = GenerationConfig {
            temperature: 0.8,
            seed: 3,
            ..cfg
        };
        let (out, stats) = speculative_generate(
            &target,
            &target,
            &prompt,
            both(&pixels),
            &sampled,
            4,
            &|_| String::new(),
        )
        .unwrap();
        assert_eq!(out.len(), 21);
        assert_eq!(stats.acceptance_rate(), 1.0);
    }

    /// Theorem 1 of Leviathan et al.: a proposal x ~ q kept with min(1, p/q), else replaced
    /// by a draw from norm(max(0, p − q)), is distributed as p.
    #[test]
    fn the_sampling_rule_turns_draft_draws_into_target_draws() {
        let p = [0.5f32, 0.1, 0.3, 0.1];
        let q = [0.1f32, 0.6, 0.2, 0.1];
        let mut rng = SeededRng::new(17);
        let n = 200_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let x = draw(&q, &mut rng);
            let y = accept_or_resample(&p, &q, x, &mut rng).unwrap_or(x);
            counts[y as usize] += 1;
        }
        for (c, &expected) in counts.iter().zip(&p) {
            let freq = *c as f32 / n as f32;
            assert!((freq - expected).abs() < 0.005, "{counts:?} vs {p:?}");
        }
        // The draft's own distribution would have been far off.
        assert!((counts[1] as f32 / n as f32 - q[1]).abs() > 0.4);
    }

    /// Sampled speculative decoding over a whole generation: the second token (the first that
    /// goes through the draft's proposals and the rule) is distributed over many seeds as the
    /// target's own sampling draws it. With the rule broken (every proposal kept) it would
    /// follow the draft, a different random model.
    #[test]
    fn sampled_speculation_has_the_targets_distribution() {
        let spec = tiny_spec();
        let target = frozen(&spec, &spec.teacher, 11);
        let draft = frozen(&spec, &spec.student, 12);
        let batch = BenchBatch::random(&spec, 5, &Device::Cpu).unwrap();
        let prompt = batch.tokens.ids[0][..spec.seq_len() - spec.response_tokens].to_vec();
        let pixels = batch.pixels.narrow(0, 0, 1).unwrap();
        // A low temperature concentrates the random models on fewer tokens.
        let cfg = |seed| GenerationConfig {
            max_new_tokens: 2,
            temperature: 0.05,
            seed,
            ..Default::default()
        };
        let runs = 1200u64;
        let mut alone = std::collections::BTreeMap::new();
        let mut drafted = std::collections::BTreeMap::new();
        let none = |_: &[u32]| String::new();
        for seed in 0..runs {
            let a = generate(
                &target,
                std::slice::from_ref(&prompt),
                Some(&pixels),
                &cfg(seed),
                &none,
            )
            .unwrap()
            .remove(0);
            *alone.entry(a[1]).or_insert(0usize) += 1;
            let (d, _) = speculative_generate(
                &target,
                &draft,
                &prompt,
                both(&pixels),
                &cfg(seed + runs),
                1,
                &none,
            )
            .unwrap();
            *drafted.entry(d[1]).or_insert(0usize) += 1;
        }
        let keys: std::collections::BTreeSet<u32> =
            alone.keys().chain(drafted.keys()).copied().collect();
        let tv: f64 = keys
            .iter()
            .map(|k| {
                let a = *alone.get(k).unwrap_or(&0) as f64 / runs as f64;
                let d = *drafted.get(k).unwrap_or(&0) as f64 / runs as f64;
                (a - d).abs()
            })
            .sum::<f64>()
            / 2.0;
        assert!(
            tv < 0.15,
            "total variation {tv} between {alone:?} and {drafted:?}"
        );
    }
}
