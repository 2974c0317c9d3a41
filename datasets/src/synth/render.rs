//! Drawing a [`Scene`] into an RGB image: anti-aliased shapes (4×4 supersampling) on a light
//! grey background with light per-pixel noise. A pure function of the scene and the image size.

use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::scene::{Object, Scene, Shape, Size};

/// Half-extent of an object, in cell widths, before its scale jitter.
fn half_extent(size: Size) -> f32 {
    match size {
        Size::Small => 0.22,
        Size::Large => 0.40,
    }
}

/// Amplitude of the per-pixel noise (uniform, ± this many levels).
const NOISE: i16 = 6;
const SUPERSAMPLE: usize = 4;

/// Whether the point (x, y), in units of the object's half-extent around its centre
/// (y grows downwards), is inside `shape`.
pub fn inside(shape: Shape, x: f32, y: f32) -> bool {
    match shape {
        Shape::Circle => x * x + y * y <= 1.0,
        Shape::Square => x.abs() <= 0.85 && y.abs() <= 0.85,
        Shape::Triangle => {
            // Apex up at (0, -1), base at y = 0.8 from x = -0.95 to 0.95.
            if !(-1.0..=0.8).contains(&y) {
                return false;
            }
            let half_width = 0.95 * (y + 1.0) / 1.8;
            x.abs() <= half_width
        }
        Shape::Star => in_polygon(&star_polygon(), x, y),
        Shape::Cross => (x.abs() <= 0.3 && y.abs() <= 0.95) || (y.abs() <= 0.3 && x.abs() <= 0.95),
    }
}

/// A five-pointed star, one point straight up: outer radius 1, inner radius 0.45.
fn star_polygon() -> [(f32, f32); 10] {
    let mut pts = [(0.0, 0.0); 10];
    for (i, p) in pts.iter_mut().enumerate() {
        let r = if i % 2 == 0 { 1.0 } else { 0.45 };
        let a = -std::f32::consts::FRAC_PI_2 + i as f32 * std::f32::consts::PI / 5.0;
        *p = (r * a.cos(), r * a.sin());
    }
    pts
}

/// Even-odd rule point-in-polygon test.
fn in_polygon(poly: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let (xi, yi) = poly[i];
        let (xj, yj) = poly[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// The object's centre and half-extent in pixels.
pub fn placement(obj: &Object, image_size: u32) -> (f32, f32, f32) {
    let cell = image_size as f32 / 3.0;
    let cx = (obj.cell.col as f32 + 0.5 + obj.offset.0) * cell;
    let cy = (obj.cell.row as f32 + 0.5 + obj.offset.1) * cell;
    (cx, cy, half_extent(obj.size) * obj.scale * cell)
}

/// Render `scene` as an `image_size`×`image_size` RGB image.
pub fn render(scene: &Scene, image_size: u32) -> RgbImage {
    let n = image_size as usize;
    // Work in f32 so objects blend over the background before noise and rounding.
    let bg = scene.background as f32;
    let mut px = vec![[bg; 3]; n * n];
    for obj in &scene.objects {
        let (cx, cy, r) = placement(obj, image_size);
        let color: [f32; 3] =
            std::array::from_fn(|c| (obj.color.rgb()[c] as i16 + obj.tint[c]).clamp(0, 255) as f32);
        let x0 = ((cx - r).floor().max(0.0)) as usize;
        let x1 = ((cx + r).ceil() as usize).min(n);
        let y0 = ((cy - r).floor().max(0.0)) as usize;
        let y1 = ((cy + r).ceil() as usize).min(n);
        for py in y0..y1 {
            for pxl in x0..x1 {
                let mut hits = 0;
                for sy in 0..SUPERSAMPLE {
                    for sx in 0..SUPERSAMPLE {
                        let x = (pxl as f32 + (sx as f32 + 0.5) / SUPERSAMPLE as f32 - cx) / r;
                        let y = (py as f32 + (sy as f32 + 0.5) / SUPERSAMPLE as f32 - cy) / r;
                        if inside(obj.shape, x, y) {
                            hits += 1;
                        }
                    }
                }
                if hits > 0 {
                    let a = hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32;
                    let p = &mut px[py * n + pxl];
                    for c in 0..3 {
                        p[c] = p[c] * (1.0 - a) + color[c] * a;
                    }
                }
            }
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(scene.noise_seed);
    let mut img = RgbImage::new(image_size, image_size);
    for (i, pixel) in img.pixels_mut().enumerate() {
        for c in 0..3 {
            let noise = rng.gen_range(-NOISE..=NOISE) as f32;
            pixel.0[c] = (px[i][c] + noise).round().clamp(0.0, 255.0) as u8;
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::super::scene::{Cell, Color};
    use super::*;

    fn scene_of(objects: Vec<(Shape, Color, Size, u8, u8)>) -> Scene {
        Scene {
            objects: objects
                .into_iter()
                .map(|(shape, color, size, row, col)| Object {
                    shape,
                    color,
                    size,
                    cell: Cell { row, col },
                    offset: (0.0, 0.0),
                    scale: 1.0,
                    tint: [0, 0, 0],
                })
                .collect(),
            noise_seed: 1,
            background: 235,
        }
    }

    fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
        a.iter()
            .zip(b)
            .all(|(&x, y)| (x as i32 - y as i32).abs() <= tol)
    }

    #[test]
    fn objects_have_their_colour_at_the_centre_and_background_elsewhere() {
        let scene = scene_of(vec![
            (Shape::Square, Color::Red, Size::Large, 0, 0),
            (Shape::Circle, Color::Blue, Size::Small, 1, 1),
            (Shape::Cross, Color::Yellow, Size::Large, 2, 2),
        ]);
        let img = render(&scene, 60);
        // Cell centres of a 60 px image: 10, 30, 50.
        assert!(
            close(img.get_pixel(10, 10).0, Color::Red.rgb(), 6),
            "{:?}",
            img.get_pixel(10, 10)
        );
        assert!(close(img.get_pixel(30, 30).0, Color::Blue.rgb(), 6));
        assert!(close(img.get_pixel(50, 50).0, Color::Yellow.rgb(), 6));
        // An empty cell is background grey.
        assert!(close(img.get_pixel(50, 10).0, [235, 235, 235], 6));
    }

    #[test]
    fn shapes_differ_where_they_should() {
        // Near the corner of the bounding box: inside the square, outside circle, cross and star.
        for (shape, expect) in [
            (Shape::Square, true),
            (Shape::Circle, false),
            (Shape::Cross, false),
            (Shape::Star, false),
            (Shape::Triangle, false),
        ] {
            assert_eq!(inside(shape, 0.8, -0.8), expect, "{shape:?}");
        }
        // Triangle: wide at the bottom, narrow at the top; cross: empty between its arms.
        assert!(inside(Shape::Triangle, 0.8, 0.7) && !inside(Shape::Triangle, 0.4, -0.7));
        assert!(!inside(Shape::Cross, 0.6, 0.6) && inside(Shape::Cross, 0.0, 0.9));
        // Star: its top point is in, the notch between two points is out.
        assert!(inside(Shape::Star, 0.0, -0.9) && !inside(Shape::Star, 0.0, 0.7));
    }

    #[test]
    fn large_objects_cover_more_pixels_than_small_ones() {
        let count = |size| {
            let img = render(
                &scene_of(vec![(Shape::Circle, Color::Green, size, 1, 1)]),
                64,
            );
            img.pixels()
                .filter(|p| close(p.0, Color::Green.rgb(), 20))
                .count()
        };
        let (small, large) = (count(Size::Small), count(Size::Large));
        assert!(
            small > 20 && large as f32 > 2.5 * small as f32,
            "small {small}, large {large}"
        );
    }
}
