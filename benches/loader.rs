//! Images per second per core through the training input pipeline: JPEG
//! decode (libjpeg-turbo via `mozjpeg`, DCT-downscaled where the crop
//! allows, stopping below the crop), RandomResizedCrop (area 0.4–1) and an
//! antialiased bilinear resize (`fast_image_resize`), single thread. The
//! inputs are 256² and 512² JPEGs at quality 90 of a fixed pattern; the
//! outputs are CLIPA's pre-training (112) and fine-tuning (224) sizes.
//! `ci/peer_loader.py` runs the same ops with Pillow, as torchvision does.

use std::hint::black_box;
use std::io::Cursor;

use clipa_core::data::ImagePayload;
use clipa_core::data::augment::{Augmenter, ImageTransform, TrainAugment};
use clipa_core::rng::Rng;
use criterion::{Criterion, Throughput};
use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};

/// A deterministic test image: smooth gradients plus a hashed texture of
/// 4×4 blocks, which gives roughly the entropy of a photo (about 0.6
/// bytes per pixel at quality 90). `ci/peer_loader.py` draws the same.
pub fn pattern(side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        let h = ((x / 4).wrapping_mul(73_856_093) ^ (y / 4).wrapping_mul(19_349_663)) % 32;
        let r = (x * 255 / side + h) % 256;
        let g = (y * 255 / side + 2 * h) % 256;
        let b = ((x + y) * 127 / side + 3 * h) % 256;
        Rgb([r as u8, g as u8, b as u8])
    })
}

/// [`pattern`] encoded as a quality-90 JPEG (the `image` encoder writes
/// 4:4:4 chroma), or `$CLIPA_LOADER_INPUTS/pattern{side}.jpg` when that
/// exists: `ci/peer_loader.py --write DIR` saves the files Pillow decodes,
/// so that both sides can time identical bytes.
pub fn jpeg(side: u32) -> Vec<u8> {
    if let Some(dir) = std::env::var_os("CLIPA_LOADER_INPUTS")
        && let Ok(bytes) =
            std::fs::read(std::path::Path::new(&dir).join(format!("pattern{side}.jpg")))
    {
        return bytes;
    }
    let mut bytes = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&pattern(side))
        .expect("encoding an in-memory image cannot fail");
    bytes.into_inner()
}

/// One sample through decode + crop + resize into `out`, as the loader's
/// workers run it.
pub fn pipeline(bytes: &[u8], augmenter: &mut Augmenter, key: u64, out: &mut [u8]) {
    augmenter
        .apply_payload(
            ImagePayload::Encoded(bytes.to_vec()),
            "bench",
            &mut Rng::keyed(&[key]),
            out,
        )
        .expect("the bench JPEG decodes into the augmenter's buffer");
}

/// Registers `cpu/loader/jpeg{256,512}_to{112,224}`.
pub fn benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu/loader");
    group.throughput(Throughput::Elements(1));
    for side in [256u32, 512] {
        let bytes = jpeg(side);
        for size in [112u32, 224] {
            let mut augmenter =
                Augmenter::new(ImageTransform::Train(TrainAugment::default()), size);
            let mut out = vec![0u8; augmenter.output_len()];
            let mut key = 0u64;
            group.bench_function(format!("jpeg{side}_to{size}"), |b| {
                b.iter(|| {
                    key += 1;
                    pipeline(black_box(&bytes), &mut augmenter, key, &mut out);
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}
