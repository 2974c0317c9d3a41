//! `mmkd teacher-cache`: the online teacher signal run over a stage's data once, its top-k
//! log-probabilities and relation matrices written by the cache store.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use mmkd_datasets::TokenizedSample;
use serde::Serialize;

use super::{run_identity, OnlineTeacher};
use crate::batch::{
    prepare_data, response_positions, training_tokenize_config, visual_positions, ModelInputs,
};
use crate::checkpoint::lock::OutputLock;
use crate::config::StageSettings;
use crate::distill::positions::gather_rows;
use crate::distill::{
    hidden_form_is_cheaper, relation_matrices, relation_matrices_from_hidden, truncate_vocab,
    TopKHost,
};
use crate::objective::Objective;
use crate::runtime::world::world;
use crate::teacher_cache::digest::digest_str;
use crate::teacher_cache::{
    teacher_identity, write_shard_of, CacheWriter, Manifest, RunIdentity, SampleRecord,
    TeacherIdentity,
};

/// What to cache.
#[derive(Clone, Debug)]
pub struct BuildRequest {
    /// Teacher checkpoint (directory or hub id).
    pub teacher: String,
    pub data: PathBuf,
    pub images: PathBuf,
    pub out: PathBuf,
    /// The settings of the stage the cache is for (template, max length, temperature, ...).
    pub settings: StageSettings,
    pub top_k: usize,
    /// Samples per teacher forward pass.
    pub batch_size: usize,
    /// Samples per shard file.
    pub shard_size: usize,
    pub progress: bool,
}

/// What `mmkd teacher-cache` reports.
#[derive(Clone, Debug, Serialize)]
pub struct BuildSummary {
    pub out: PathBuf,
    pub samples: usize,
    /// Samples kept from an interrupted earlier run.
    pub resumed_samples: usize,
    pub response_positions: usize,
    pub visual_positions: usize,
    pub top_k: usize,
    pub vocab: usize,
    pub shards: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub samples_per_s: f64,
    pub skipped: BTreeMap<String, usize>,
}

/// Writes the cache (or finishes an interrupted one) and returns its summary.
/// A write refused by the storage (a full disk, a read-only directory) says what was kept.
pub fn build_cache(req: &BuildRequest) -> Result<BuildSummary> {
    write_cache(req).map_err(|e| {
        crate::checkpoint::storage::explain(
            e,
            &req.out,
            || crate::teacher_cache::store::describe_partial(&req.out),
            "run the same command again to resume after them",
        )
    })
}

fn write_cache(req: &BuildRequest) -> Result<BuildSummary> {
    let started = Instant::now();
    let settings = &req.settings;
    settings.distill.validate()?;
    let objective = Objective::new(&settings.objective, &settings.distill)?;
    ensure!(
        objective.teacher_term().is_some(),
        "a teacher cache is for objectives that read a teacher; the objective of `{}` ({}) reads none",
        settings.stage.name(),
        objective.names().join(", ")
    );
    ensure!(req.batch_size > 0, "--batch-size must be at least 1");
    let teacher = OnlineTeacher::load(&req.teacher, settings)?;
    let model = &teacher.model.model;
    let full_vocab = model.config.text_config.vocab_size;
    let vocab = match settings.train.truncate_vocab {
        Some(n) => {
            ensure!(
                n <= full_vocab,
                "truncate_vocab = {n} exceeds the teacher's vocabulary ({full_vocab})"
            );
            n
        }
        None => full_vocab,
    };
    ensure!(
        req.top_k >= 1 && req.top_k <= vocab,
        "--top-k must be between 1 and the vocabulary ({vocab}), got {}",
        req.top_k
    );
    let template = mmkd_datasets::Template::by_name_or_path(&settings.template())?;
    let data = prepare_data(
        &req.data,
        &req.images,
        &teacher.model.tokenizer,
        &template,
        &training_tokenize_config(model, settings.data.max_length),
        "teacher-cache",
    )?;
    let run = run_identity(
        settings,
        &req.data,
        &req.images,
        &template,
        &teacher.model.tokenizer,
        &teacher.model.processor,
    )?;
    let teacher_id = teacher_identity(&teacher.model.model_dir)?;
    let relations = objective.needs_teacher_relations();
    let job = serde_json::json!({
        "run": run, "teacher": teacher_id, "top_k": req.top_k, "relations": relations,
        "shard_size": req.shard_size,
    });
    // In a data-parallel build every rank runs the teacher on its own shards; rank 0 alone
    // keeps the progress and writes the manifest.
    let world = world();
    world.agree(&digest_str(&job.to_string()))?;
    let leader = world.is_leader();
    // The cache is renamed into place at the end, so its lock sits next to it.
    let _lock = leader
        .then(|| OutputLock::acquire_beside(&req.out))
        .transpose()?;
    let (mut writer, done) = match leader {
        true => {
            let (writer, done) = CacheWriter::open(&req.out, job, req.top_k, req.shard_size)?;
            (Some(writer), done)
        }
        false => (None, 0),
    };
    // Every rank learns where the finished shards end, once rank 0 has made their directory.
    let mut done_bytes = (done as u64).to_le_bytes().to_vec();
    world.broadcast(&mut done_bytes, 0, "the broadcast of the cached samples")?;
    let done = u64::from_le_bytes(done_bytes.try_into().unwrap_or_default()) as usize;
    let shards_dir = CacheWriter::shards_dir(&req.out)?;

    let bar = crate::progress::count_bar(
        req.progress && leader,
        "teacher-cache",
        "samples",
        data.samples.len(),
        done,
    );
    let writer_cfg = Writing {
        teacher: &teacher,
        vocab: if settings.train.truncate_vocab.is_some() {
            Some(vocab)
        } else {
            None
        },
        top_k: req.top_k,
        temperature: settings.distill.temperature,
        relations,
    };
    // Shard i holds samples i·S .. (i+1)·S; the ranks write a round of consecutive shards
    // side by side, so the finished ones are always a prefix.
    let total = data.samples.len();
    let blocks: Vec<_> = (done..total)
        .step_by(req.shard_size)
        .map(|start| start..(start + req.shard_size).min(total))
        .collect();
    for (round, blocks) in blocks.chunks(world.size()).enumerate() {
        let first_shard = done / req.shard_size + round * world.size();
        if let Some(block) = blocks.get(world.rank()) {
            let mut records = Vec::with_capacity(block.len());
            for (at, chunk) in data.samples[block.clone()]
                .chunks(req.batch_size)
                .enumerate()
            {
                records.extend(writer_cfg.records(chunk, block.start + at * req.batch_size)?);
            }
            write_shard_of(&shards_dir, first_shard + world.rank(), req.top_k, &records)?;
        }
        world.barrier("the end of a round of cache shards")?;
        if let Some(writer) = &mut writer {
            for (i, block) in blocks.iter().enumerate() {
                writer.add_shard(first_shard + i, block.len())?;
            }
        }
        bar.inc(blocks.iter().map(|b| b.len() as u64).sum());
    }
    bar.finish_and_clear();

    let image_token_id = model.image_token_id();
    let response_count: usize = data
        .samples
        .iter()
        .map(|s| response_positions(s).len())
        .sum();
    let visual_count: usize = data
        .samples
        .iter()
        .map(|s| visual_positions(s, image_token_id).len())
        .sum();
    let skipped: BTreeMap<String, usize> = data
        .report
        .skipped_by_kind()
        .into_iter()
        .map(|(k, n)| (format!("{k:?}"), n))
        .collect();
    let finished = match writer {
        Some(writer) => Some(writer.finish(manifest_for(
            run,
            teacher_id,
            req,
            vocab,
            &teacher,
            relations,
            data.samples.len(),
            response_count,
            visual_count,
            skipped.clone(),
        ))?),
        None => None,
    };
    // The other ranks read the manifest rank 0 wrote.
    world.barrier("the end of the cache")?;
    let manifest = match finished {
        Some(manifest) => manifest,
        None => Manifest::read(&req.out)?,
    };
    let seconds = started.elapsed().as_secs_f64();
    Ok(BuildSummary {
        out: req.out.clone(),
        samples: manifest.samples,
        resumed_samples: done,
        response_positions: response_count,
        visual_positions: visual_count,
        top_k: req.top_k,
        vocab,
        shards: manifest.shards.len(),
        bytes: manifest.shards.iter().map(|s| s.bytes).sum(),
        seconds,
        samples_per_s: (manifest.samples - done) as f64 / seconds.max(1e-9),
        skipped,
    })
}

#[allow(clippy::too_many_arguments)]
fn manifest_for(
    run: RunIdentity,
    teacher: TeacherIdentity,
    req: &BuildRequest,
    vocab: usize,
    prepared: &OnlineTeacher,
    relations: bool,
    samples: usize,
    response_positions: usize,
    visual_positions: usize,
    skipped: BTreeMap<String, usize>,
) -> Manifest {
    Manifest {
        run,
        teacher,
        top_k: req.top_k,
        vocab,
        image_token_id: prepared.model.model.image_token_id(),
        tokens_per_image: prepared.model.model.tokens_per_image(),
        relations,
        visual: true,
        data: req.data.display().to_string(),
        samples,
        response_positions,
        visual_positions,
        skipped,
        shards: Vec::new(),
    }
}

/// How one batch of samples becomes cache records.
struct Writing<'a> {
    teacher: &'a OnlineTeacher,
    /// Cut the logits to this vocabulary.
    vocab: Option<usize>,
    top_k: usize,
    temperature: f64,
    relations: bool,
}

impl Writing<'_> {
    /// The records of `samples`, the dataset's samples `first..first + samples.len()`.
    fn records(&self, samples: &[TokenizedSample], first: usize) -> Result<Vec<SampleRecord>> {
        let model = &self.teacher.model.model;
        let refs: Vec<&TokenizedSample> = samples.iter().collect();
        let indices: Vec<usize> = (first..first + samples.len()).collect();
        let batch = ModelInputs::new(
            mmkd_datasets::collate(&refs, &indices, &crate::batch::TRAINING_COLLATE),
            &self.teacher.model.processor,
            model,
        )?;
        let out = self.teacher.forward(&batch)?;
        let logits = match self.vocab {
            Some(n) => truncate_vocab(&out.logits.detach(), n)?,
            None => out.logits.detach(),
        };
        let seq = batch.tokens.seq_len();
        let image_token_id = model.image_token_id();
        let response_pos: Vec<Vec<u32>> = samples.iter().map(response_positions).collect();
        let visual_pos: Vec<Vec<u32>> = samples
            .iter()
            .map(|s| visual_positions(s, image_token_id))
            .collect();
        // Flat row indices b·seq + t of every sample's positions.
        let flat = |positions: &[Vec<u32>]| -> Vec<u32> {
            positions
                .iter()
                .enumerate()
                .flat_map(|(b, p)| p.iter().map(move |&t| (b * seq) as u32 + t))
                .collect()
        };
        let top = |rows: Vec<u32>| -> Result<TopKHost> {
            if rows.is_empty() {
                return Ok(TopKHost::empty(self.top_k));
            }
            TopKHost::from_logits(&gather_rows(&logits, &rows)?, self.top_k, self.temperature)
        };
        let response = top(flat(&response_pos))?;
        let visual = top(flat(&visual_pos))?;
        let relation_mats = if self.relations {
            let mask = &batch.visual_mask;
            let visual_counts: Vec<usize> = visual_pos.iter().map(Vec::len).collect();
            let (_, _, hidden) = out.hidden.dims3()?;
            if self.vocab.is_none()
                && hidden_form_is_cheaper(&visual_counts, logits.dim(2)?, hidden, hidden)
            {
                relation_matrices_from_hidden(&out.hidden, model.lm.lm_head_weight(), mask)?
            } else {
                relation_matrices(&logits, mask)?
            }
        } else {
            vec![None; samples.len()]
        };
        let (mut r_at, mut v_at) = (0, 0);
        let mut records = Vec::with_capacity(samples.len());
        let positions = response_pos.into_iter().zip(visual_pos);
        for ((sample, (rp, vp)), rel) in samples.iter().zip(positions).zip(relation_mats) {
            let relation = match rel {
                Some(r) => Some(r.flatten_all()?.to_vec1::<f32>()?),
                None => None,
            };
            records.push(SampleRecord {
                index: sample.index,
                response: response.slice(r_at, rp.len())?,
                visual: visual.slice(v_at, vp.len())?,
                response_positions: rp,
                visual_positions: vp,
                relation,
            });
            r_at += records.last().map_or(0, |r| r.response_positions.len());
            v_at += records.last().map_or(0, |r| r.visual_positions.len());
        }
        Ok(records)
    }
}

/// The one-line summary `mmkd teacher-cache` prints.
pub fn describe(summary: &BuildSummary) -> String {
    format!(
        "teacher-cache: {} samples ({} kept from an interrupted run), {} response + {} visual positions, \
         top-{} of {}, {} shards, {:.1} MiB, {:.1}s ({:.1} samples/s); cache in {}",
        summary.samples,
        summary.resumed_samples,
        summary.response_positions,
        summary.visual_positions,
        summary.top_k,
        summary.vocab,
        summary.shards,
        summary.bytes as f64 / (1024.0 * 1024.0),
        summary.seconds,
        summary.samples_per_s,
        summary.out.display()
    )
}
