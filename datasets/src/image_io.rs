//! Opening image files: full decoding for training, cheap checks for data validation.
//!
//! Images are never kept in memory by the dataset; they are decoded when a batch asks for them.
//! Preprocessing (resize, normalise) is the vision tower's job, not this crate's.

use std::fs::File;
use std::io::{BufReader, ErrorKind};
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader};

use crate::problem::ProblemKind;

/// The most memory one decoded image may take (the image crate's default allocation limit).
pub const MAX_DECODED_BYTES: u64 = 512 << 20;

/// How thoroughly images are checked before training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageCheck {
    /// Trust the paths.
    None,
    /// The file exists (a `stat` per image).
    #[default]
    Exists,
    /// The header is readable and in a supported format (reads a few bytes per image).
    Header,
    /// The whole image decodes (what `mmkd data check` does).
    Decode,
}

/// Why an image cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image {path}: {reason}")]
pub struct ImageFault {
    pub path: String,
    pub kind: ProblemKind,
    pub reason: String,
}

fn fault(path: &Path, kind: ProblemKind, reason: impl Into<String>) -> ImageFault {
    ImageFault {
        path: path.display().to_string(),
        kind,
        reason: reason.into(),
    }
}

fn open(path: &Path) -> Result<ImageReader<BufReader<File>>, ImageFault> {
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => fault(path, ProblemKind::MissingImage, "file not found"),
        _ => fault(path, ProblemKind::MissingImage, format!("cannot open: {e}")),
    })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(fault(
            path,
            ProblemKind::MissingImage,
            "is a directory, not an image file",
        ));
    }
    // The format is guessed from the content first so a mislabelled extension still decodes.
    ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .map_err(|e| fault(path, ProblemKind::CorruptImage, format!("cannot read: {e}")))
        .map(|mut r| {
            if r.format().is_none() {
                if let Ok(f) = image::ImageFormat::from_path(path) {
                    r.set_format(f);
                }
            }
            r
        })
}

fn classify(path: &Path, err: ImageError) -> ImageFault {
    match err {
        ImageError::Unsupported(e) => fault(
            path,
            ProblemKind::UnsupportedImage,
            format!("unsupported: {e}"),
        ),
        ImageError::IoError(e) if e.kind() == ErrorKind::NotFound => {
            fault(path, ProblemKind::MissingImage, "file not found")
        }
        other => fault(
            path,
            ProblemKind::CorruptImage,
            format!("cannot decode: {other}"),
        ),
    }
}

/// Decodes an image file (PNG, JPEG, BMP, GIF, WebP) into memory, applying its EXIF
/// orientation as transformers' `load_image` does. The one image loader of mmkd: training
/// batches, data checks and the vision crate's preprocessing all read images through it.
pub fn load_image(path: &Path) -> Result<DynamicImage, ImageFault> {
    let reader = open(path)?;
    if reader.format().is_none() {
        return Err(fault(
            path,
            ProblemKind::UnsupportedImage,
            "unrecognised image format",
        ));
    }
    let mut decoder = reader.into_decoder().map_err(|e| classify(path, e))?;
    // The decoder allocates what the header declares: a few corrupt bytes can ask for 100 GB.
    let (width, height) = decoder.dimensions();
    if decoder.total_bytes() > MAX_DECODED_BYTES {
        return Err(fault(
            path,
            ProblemKind::CorruptImage,
            format!(
                "the header declares {width}×{height} pixels ({} MiB decoded), beyond the {} MiB \
                 an image may take",
                decoder.total_bytes() >> 20,
                MAX_DECODED_BYTES >> 20
            ),
        ));
    }
    let orientation = decoder.orientation().map_err(|e| classify(path, e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| classify(path, e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Check one image at the given level; `Ok(())` when it is usable.
pub fn check_image(path: &Path, level: ImageCheck) -> Result<(), ImageFault> {
    match level {
        ImageCheck::None => Ok(()),
        ImageCheck::Exists => match std::fs::metadata(path) {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fault(
                path,
                ProblemKind::MissingImage,
                "is not a regular file",
            )),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                Err(fault(path, ProblemKind::MissingImage, "file not found"))
            }
            Err(e) => Err(fault(
                path,
                ProblemKind::MissingImage,
                format!("cannot stat: {e}"),
            )),
        },
        ImageCheck::Header => {
            let reader = open(path)?;
            if reader.format().is_none() {
                return Err(fault(
                    path,
                    ProblemKind::UnsupportedImage,
                    "unrecognised image format",
                ));
            }
            reader
                .into_dimensions()
                .map(|_| ())
                .map_err(|e| classify(path, e))
        }
        ImageCheck::Decode => load_image(path).map(|_| ()),
    }
}
