//! LLaVA's splice: the embeddings at image-token positions are replaced, in order, by the
//! projected image features. Differentiable with respect to both the text embeddings and the
//! image features (one `index_select` over their concatenation).

use anyhow::{ensure, Result};
use candle_core::Tensor;

/// Where the image tokens sit in a batch of token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VisualPositions {
    /// `mask[b][t]` is 1 where sample b holds an image token at t.
    pub mask: Vec<Vec<u8>>,
    /// Total number of image-token positions in the batch.
    pub count: usize,
}

impl VisualPositions {
    pub fn find(ids: &[Vec<u32>], image_token_id: u32) -> Self {
        let mask: Vec<Vec<u8>> = ids
            .iter()
            .map(|row| row.iter().map(|&t| u8::from(t == image_token_id)).collect())
            .collect();
        let count = mask.iter().flatten().map(|&m| m as usize).sum();
        Self { mask, count }
    }

    /// Positions of sample `b` that hold image tokens.
    pub fn of_sample(&self, b: usize) -> Vec<usize> {
        self.mask[b]
            .iter()
            .enumerate()
            .filter_map(|(t, &m)| (m == 1).then_some(t))
            .collect()
    }
}

/// Replaces rows of `text_embeds` (`[b, s, h]`) at the visual positions with the rows of
/// `image_features` (`[n_images, tokens, h]`), images taken in sample order.
pub fn splice_image_features(
    text_embeds: &Tensor,
    positions: &VisualPositions,
    image_features: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, h) = text_embeds.dims3()?;
    let (n_images, per_image, feature_rows) = match image_features {
        Some(f) => {
            let (n, t, fh) = f.dims3()?;
            ensure!(
                fh == h,
                "image features have width {fh}, the language model's hidden size is {h}"
            );
            (n, t, n * t)
        }
        None => (0, 0, 0),
    };
    ensure!(
        feature_rows == positions.count,
        "the batch has {} image-token positions but the images give {} features ({} image(s) × {} tokens); \
         each image needs exactly {} consecutive image tokens in the text",
        positions.count,
        feature_rows,
        n_images,
        per_image,
        per_image
    );
    if feature_rows == 0 {
        return Ok(text_embeds.clone());
    }
    let features = image_features.expect("feature_rows > 0 implies features");
    let text_rows = b * s;
    let mut index = Vec::with_capacity(text_rows);
    let mut next_feature = 0u32;
    for (r, row) in positions.mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                index.push(text_rows as u32 + next_feature);
                next_feature += 1;
            } else {
                index.push((r * s + t) as u32);
            }
        }
    }
    let all = Tensor::cat(
        &[
            &text_embeds.reshape((text_rows, h))?,
            &features
                .reshape((feature_rows, h))?
                .to_dtype(text_embeds.dtype())?,
        ],
        0,
    )?;
    let index = Tensor::from_vec(index, text_rows, text_embeds.device())?;
    Ok(all.index_select(&index, 0)?.reshape((b, s, h))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn splices_in_order_and_passes_gradients_to_both_sides() {
        let dev = Device::Cpu;
        // Sample 0: image at t=1..2; sample 1: text only; sample 2: image at t=0..1.
        let ids = vec![vec![5, 9, 9, 6], vec![5, 6, 7, 0], vec![9, 9, 8, 0]];
        let pos = VisualPositions::find(&ids, 9);
        assert_eq!(pos.count, 4);
        assert_eq!(pos.of_sample(0), vec![1, 2]);
        let text = Var::from_tensor(
            &Tensor::arange(0f32, 12., &dev)
                .unwrap()
                .reshape((3, 4, 1))
                .unwrap(),
        )
        .unwrap();
        let feats =
            Var::from_tensor(&Tensor::new(&[[[100f32], [101.]], [[200.], [201.]]], &dev).unwrap())
                .unwrap();
        let out = splice_image_features(text.as_tensor(), &pos, Some(feats.as_tensor())).unwrap();
        let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            v,
            vec![0., 100., 101., 3., 4., 5., 6., 7., 200., 201., 10., 11.]
        );
        let grads = (out.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let gt: Vec<f32> = grads
            .get(text.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            gt,
            vec![0., 0., 0., 6., 8., 10., 12., 14., 0., 0., 20., 22.]
        );
        let gf: Vec<f32> = grads
            .get(feats.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(gf, vec![200., 202., 400., 402.]);
    }

    #[test]
    fn count_mismatch_is_a_clear_error() {
        let dev = Device::Cpu;
        let ids = vec![vec![9, 9, 9, 1]];
        let pos = VisualPositions::find(&ids, 9);
        let text = Tensor::zeros((1, 4, 2), candle_core::DType::F32, &dev).unwrap();
        let feats = Tensor::zeros((1, 2, 2), candle_core::DType::F32, &dev).unwrap();
        let err = splice_image_features(&text, &pos, Some(&feats))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("3 image-token positions") && err.contains("2 features"),
            "{err}"
        );
        let err = splice_image_features(&text, &pos, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("0 features"), "{err}");
    }
}
