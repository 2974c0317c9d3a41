//! mmkd-vision: image preprocessing matching transformers' image processors, differentiable
//! SigLIP/CLIP vision towers, and LLaVA's selection of image features from their hidden states.

pub mod config;
mod geometry;
pub mod image_io;
pub mod preprocess;
mod processor_config;
pub mod resample;
pub mod select;
pub mod tower;
pub mod weights;

pub use config::{VisionConfig, VisionKind};
pub use image_io::load_image;
pub use preprocess::{to_tensor, ImageProcessor, ProcessorKind, ResizeTo};
pub use resample::Resample;
pub use select::{FeatureLayers, FeatureSelect, SelectStrategy};
pub use tower::{VisionOutput, VisionTower};
pub use weights::{canonical_vision_name, canonicalize_vision_names, load_vision_weights};
