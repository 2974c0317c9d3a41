//! One shard: a safetensors file holding the cached rows of consecutive samples, concatenated,
//! with a table of where each sample's rows are. Read memory-mapped.
//!
//! Tensors: `samples` u64 `[n, 7]` (record index, response start, response rows, visual start,
//! visual rows, relation start, relation side), then for `response` and `visual`:
//! `*_positions` u32 `[rows]` (positions within the sample), `*_ids` u32 `[rows, k]`,
//! `*_log_probs` f32 `[rows, k]`, `*_rest` f32 `[rows]`; and `relations` f32 (each sample's
//! side × side matrix, row-major, concatenated).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::distill::TopKHost;

/// What the cache keeps for one sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SampleRecord {
    /// The record's position in the data file (the lookup key).
    pub index: usize,
    /// Positions t whose logit is distilled by L_res (label t + 1 supervised), ascending.
    pub response_positions: Vec<u32>,
    pub response: TopKHost,
    /// Image-token positions (L_vis), ascending.
    pub visual_positions: Vec<u32>,
    pub visual: TopKHost,
    /// The teacher's relation matrix over the visual positions, row-major
    /// (side = visual positions), when relations are cached and the sample has images.
    pub relation: Option<Vec<f32>>,
}

const TABLE_COLUMNS: usize = 7;

/// Rows of several samples gathered for writing.
#[derive(Debug)]
pub struct ShardBuffer {
    k: usize,
    table: Vec<u64>,
    response_positions: Vec<u32>,
    response: TopKHost,
    visual_positions: Vec<u32>,
    visual: TopKHost,
    relations: Vec<f32>,
}

impl ShardBuffer {
    pub fn new(k: usize) -> Self {
        Self {
            k,
            table: Vec::new(),
            response_positions: Vec::new(),
            response: TopKHost::empty(k),
            visual_positions: Vec::new(),
            visual: TopKHost::empty(k),
            relations: Vec::new(),
        }
    }

    pub fn samples(&self) -> usize {
        self.table.len() / TABLE_COLUMNS
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn push(&mut self, r: &SampleRecord) -> Result<()> {
        ensure!(
            r.response.rows() == r.response_positions.len()
                && r.visual.rows() == r.visual_positions.len(),
            "sample record {}: rows and positions disagree",
            r.index
        );
        let side = r.visual_positions.len();
        if let Some(rel) = &r.relation {
            ensure!(
                rel.len() == side * side,
                "sample record {}: relation matrix of {} values for {side} visual positions",
                r.index,
                rel.len()
            );
        }
        self.table.extend([
            r.index as u64,
            self.response_positions.len() as u64,
            r.response_positions.len() as u64,
            self.visual_positions.len() as u64,
            r.visual_positions.len() as u64,
            self.relations.len() as u64,
            if r.relation.is_some() { side as u64 } else { 0 },
        ]);
        self.response_positions
            .extend_from_slice(&r.response_positions);
        self.response.extend(&r.response)?;
        self.visual_positions.extend_from_slice(&r.visual_positions);
        self.visual.extend(&r.visual)?;
        if let Some(rel) = &r.relation {
            self.relations.extend_from_slice(rel);
        }
        Ok(())
    }

    /// Writes the shard to `path` (the caller renames it into place).
    pub fn write(&self, path: &Path) -> Result<()> {
        let k = self.k;
        let bytes_u64 = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bytes_u32 = |v: &[u32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bytes_f32 = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (nr, nv) = (self.response.rows(), self.visual.rows());
        let owned: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
            (
                "samples",
                Dtype::U64,
                vec![self.samples(), TABLE_COLUMNS],
                bytes_u64(&self.table),
            ),
            (
                "response_positions",
                Dtype::U32,
                vec![nr],
                bytes_u32(&self.response_positions),
            ),
            (
                "response_ids",
                Dtype::U32,
                vec![nr, k],
                bytes_u32(&self.response.ids),
            ),
            (
                "response_log_probs",
                Dtype::F32,
                vec![nr, k],
                bytes_f32(&self.response.log_probs),
            ),
            (
                "response_rest",
                Dtype::F32,
                vec![nr],
                bytes_f32(&self.response.rest),
            ),
            (
                "visual_positions",
                Dtype::U32,
                vec![nv],
                bytes_u32(&self.visual_positions),
            ),
            (
                "visual_ids",
                Dtype::U32,
                vec![nv, k],
                bytes_u32(&self.visual.ids),
            ),
            (
                "visual_log_probs",
                Dtype::F32,
                vec![nv, k],
                bytes_f32(&self.visual.log_probs),
            ),
            (
                "visual_rest",
                Dtype::F32,
                vec![nv],
                bytes_f32(&self.visual.rest),
            ),
            (
                "relations",
                Dtype::F32,
                vec![self.relations.len()],
                bytes_f32(&self.relations),
            ),
        ];
        let views = owned
            .iter()
            .map(|(name, dtype, shape, data)| {
                Ok((*name, TensorView::new(*dtype, shape.clone(), data)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta = HashMap::from([("top_k".to_string(), k.to_string())]);
        safetensors::serialize_to_file(views, Some(meta), path)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Where one sample's rows are in its shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleSlot {
    pub index: usize,
    response_start: usize,
    pub response_rows: usize,
    visual_start: usize,
    pub visual_rows: usize,
    relation_start: usize,
    pub relation_side: usize,
}

/// A memory-mapped shard.
pub struct ShardReader {
    file: String,
    k: usize,
    st: MmapedSafetensors,
    pub slots: Vec<SampleSlot>,
}

impl ShardReader {
    /// Maps `path` and checks its table against the tensors' sizes.
    pub fn open(path: &Path, k: usize) -> Result<ShardReader> {
        let file = path.display().to_string();
        if !path.exists() {
            bail!("teacher cache shard {file} is missing");
        }
        // Safety: the cache's shards are never written in place (temporary file + rename), so
        // the mapped file does not change under us while mmkd owns the cache directory.
        let st = unsafe { MmapedSafetensors::new(path) }
            .with_context(|| format!("teacher cache shard {file} is unreadable (corrupt?)"))?;
        let mut reader = ShardReader {
            file,
            k,
            st,
            slots: Vec::new(),
        };
        let table = reader.u64s("samples")?;
        ensure!(
            table.len() % TABLE_COLUMNS == 0,
            "{}: sample table of {} values",
            reader.file,
            table.len()
        );
        // Every tensor's kind and length, checked once here, so the reads below cannot go
        // out of range whatever the file holds.
        let nr = reader.rows_of("response_rest", Dtype::F32, 1)?;
        let nv = reader.rows_of("visual_rest", Dtype::F32, 1)?;
        let nrel = reader.rows_of("relations", Dtype::F32, 1)?;
        for (name, dtype, want) in [
            ("response_positions", Dtype::U32, [nr, 1]),
            ("visual_positions", Dtype::U32, [nv, 1]),
            ("response_ids", Dtype::U32, [nr, k]),
            ("visual_ids", Dtype::U32, [nv, k]),
            ("response_log_probs", Dtype::F32, [nr, k]),
            ("visual_log_probs", Dtype::F32, [nv, k]),
        ] {
            let view = reader.view(name)?;
            let shape = view.shape().to_vec();
            let fits = if want[1] == 1 {
                shape == [want[0]]
            } else {
                shape == want
            };
            ensure!(
                view.dtype() == dtype && fits,
                "{}: `{name}` is {:?} {shape:?}, expected {dtype:?} {:?} (top-k = {k})",
                reader.file,
                view.dtype(),
                if want[1] == 1 { &want[..1] } else { &want[..] }
            );
        }
        let mut slots = Vec::with_capacity(table.len() / TABLE_COLUMNS);
        for c in table.chunks_exact(TABLE_COLUMNS) {
            let c: Vec<usize> = c.iter().map(|&v| v as usize).collect();
            let slot = SampleSlot {
                index: c[0],
                response_start: c[1],
                response_rows: c[2],
                visual_start: c[3],
                visual_rows: c[4],
                relation_start: c[5],
                relation_side: c[6],
            };
            let within = |start: usize, len: Option<usize>, total: usize| {
                len.and_then(|len| start.checked_add(len))
                    .is_some_and(|end| end <= total)
            };
            ensure!(
                within(slot.response_start, Some(slot.response_rows), nr)
                    && within(slot.visual_start, Some(slot.visual_rows), nv)
                    && within(
                        slot.relation_start,
                        slot.relation_side.checked_mul(slot.relation_side),
                        nrel
                    ),
                "{}: the rows of record {} lie outside the shard (corrupt?)",
                reader.file,
                slot.index
            );
            slots.push(slot);
        }
        reader.slots = slots;
        Ok(reader)
    }

    /// The length of the `dims`-dimensional tensor `name` of type `dtype`.
    fn rows_of(&self, name: &str, dtype: Dtype, dims: usize) -> Result<usize> {
        let view = self.view(name)?;
        ensure!(
            view.dtype() == dtype && view.shape().len() == dims,
            "{}: `{name}` is {:?} {:?}, expected a {dims}-d {dtype:?} tensor",
            self.file,
            view.dtype(),
            view.shape()
        );
        Ok(view.shape()[0])
    }

    fn view(&self, name: &str) -> Result<TensorView<'_>> {
        self.st
            .get(name)
            .with_context(|| format!("{}: no tensor `{name}` (corrupt shard?)", self.file))
    }

    fn bytes(&self, name: &str, dtype: Dtype) -> Result<&[u8]> {
        let v = self.view(name)?;
        ensure!(
            v.dtype() == dtype,
            "{}: `{name}` is {:?}, expected {dtype:?}",
            self.file,
            v.dtype()
        );
        Ok(v.data())
    }

    fn u64s(&self, name: &str) -> Result<Vec<u64>> {
        Ok(self
            .bytes(name, Dtype::U64)?
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect())
    }

    fn u32_range(&self, name: &str, start: usize, len: usize) -> Result<&[u8]> {
        self.range(name, Dtype::U32, start, len)
    }

    fn f32_range(&self, name: &str, start: usize, len: usize) -> Result<&[u8]> {
        self.range(name, Dtype::F32, start, len)
    }

    /// Elements `start..start + len` of a 4-byte tensor (bounds checked by `open`; checked
    /// again here rather than trusted).
    fn range(&self, name: &str, dtype: Dtype, start: usize, len: usize) -> Result<&[u8]> {
        let bytes = self.bytes(name, dtype)?;
        start
            .checked_add(len)
            .and_then(|end| bytes.get(start.checked_mul(4)?..end.checked_mul(4)?))
            .with_context(|| {
                format!(
                    "{}: rows {start}+{len} of `{name}` lie outside it",
                    self.file
                )
            })
    }

    /// Appends one sample's rows of `part` (`response` or `visual`) to `positions` and `out`.
    pub fn read_rows(
        &self,
        slot: &SampleSlot,
        part: Part,
        positions: &mut Vec<u32>,
        out: &mut TopKHost,
    ) -> Result<()> {
        let k = self.k;
        let (start, rows) = match part {
            Part::Response => (slot.response_start, slot.response_rows),
            Part::Visual => (slot.visual_start, slot.visual_rows),
        };
        let name = part.name();
        positions.extend(
            self.u32_range(&format!("{name}_positions"), start, rows)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        out.ids.extend(
            self.u32_range(&format!("{name}_ids"), start * k, rows * k)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        out.log_probs.extend(
            self.f32_range(&format!("{name}_log_probs"), start * k, rows * k)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        out.rest.extend(
            self.f32_range(&format!("{name}_rest"), start, rows)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        Ok(())
    }

    /// One sample's relation matrix, `None` when none is stored.
    pub fn relation(&self, slot: &SampleSlot) -> Result<Option<Vec<f32>>> {
        if slot.relation_side == 0 {
            return Ok(None);
        }
        let n = slot.relation_side * slot.relation_side;
        Ok(Some(
            self.f32_range("relations", slot.relation_start, n)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
        ))
    }

    pub fn file(&self) -> &str {
        &self.file
    }
}

/// Which rows of a sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Response,
    Visual,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Response => "response",
            Part::Visual => "visual",
        }
    }
}
