//! Tests of `augment`.

use image::{DynamicImage, ImageFormat, Rgb};

use super::*;

/// A `w`×`h` image of uniform noise (also the colour tests' input).
pub(crate) fn noise(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = Rng::new(seed);
    RgbImage::from_fn(w, h, |_, _| {
        Rgb([
            rng.below(256) as u8,
            rng.below(256) as u8,
            rng.below(256) as u8,
        ])
    })
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).expect("encode test image");
    bytes.into_inner()
}

#[test]
fn crop_stays_inside_with_area_and_ratio_in_range() {
    let aug = TrainAugment::default();
    let mut rng = Rng::new(1);
    let (w, h) = (640u32, 480u32);
    let mut mean_area = 0.0;
    for _ in 0..2000 {
        let c = aug.sample_crop(w, h, &mut rng);
        assert!(
            c.width > 0 && c.height > 0 && c.left + c.width <= w && c.top + c.height <= h,
            "{c:?}"
        );
        let area = f64::from(c.width * c.height) / f64::from(w * h);
        let ratio = f64::from(c.width) / f64::from(c.height);
        // Rounding w and h to integers moves area and ratio by < 1 %.
        assert!((0.39..=1.0).contains(&area), "{area}");
        assert!((0.74..=1.345).contains(&ratio), "{ratio}");
        mean_area += area / 2000.0;
    }
    // 0.6031 by simulating torchvision's get_params in Python (2e5
    // draws); uniform 0.4..1 would be 0.7, rejections trim large crops.
    assert!((0.59..0.615).contains(&mean_area), "{mean_area}");
}

#[test]
fn crop_falls_back_to_the_central_ratio_clamped_box() {
    // No crop of >= 40 % area fits a 10x1000 strip at ratio >= 3/4.
    let c = TrainAugment::default().sample_crop(10, 1000, &mut Rng::new(2));
    assert_eq!(
        c,
        CropBox {
            left: 0,
            top: 493,
            width: 10,
            height: 13
        }
    );
}

#[test]
fn uniform_colour_survives_every_transform() {
    let img = RgbImage::from_pixel(50, 40, Rgb([200, 100, 50]));
    let modes = [
        ImageTransform::Train(TrainAugment::default()),
        ImageTransform::EvalCenterCrop,
        ImageTransform::EvalSquash,
    ];
    for mode in modes {
        let out = mode.apply(&img, 16, &mut Rng::new(3)).expect("transform");
        assert_eq!(out.dimensions(), (16, 16));
        assert!(out.pixels().all(|p| p.0 == [200, 100, 50]), "{mode:?}");
    }
}

#[test]
fn full_crop_without_jitter_is_the_identity() {
    let img = noise(24, 24, 4);
    let aug = TrainAugment {
        scale: (1.0, 1.0),
        ratio: (1.0, 1.0),
        ..TrainAugment::default()
    };
    let out = ImageTransform::Train(aug)
        .apply(&img, 24, &mut Rng::new(5))
        .expect("transform");
    assert_eq!(out.as_raw(), img.as_raw());
}

#[test]
fn strong_augment_is_seeded_and_changes_pixels() {
    let img = noise(40, 30, 9);
    let strong = ImageTransform::Train(TrainAugment::clipa_strong());
    let plain = ImageTransform::Train(TrainAugment::default());
    let a = strong
        .apply(&img, 16, &mut Rng::new(10))
        .expect("transform");
    assert_eq!(
        a,
        strong
            .apply(&img, 16, &mut Rng::new(10))
            .expect("transform")
    );
    let changed = (0..20u64)
        .filter(|&s| {
            strong.apply(&img, 16, &mut Rng::new(s)).ok()
                != plain.apply(&img, 16, &mut Rng::new(s)).ok()
        })
        .count();
    // Jitter (p 0.8) or grey (p 0.2) fires unless both miss (p 0.16).
    assert!((10..=20).contains(&changed), "{changed}");
    assert!(TrainAugment::clipa_strong().validate().is_ok());
    assert!(
        TrainAugment {
            scale: (0.0, 1.0),
            ..TrainAugment::default()
        }
        .validate()
        .is_err()
    );
}

#[test]
fn eval_center_crop_shows_the_middle() {
    // 40x20: red left half, blue right half. Centre crop to 10 keeps
    // source columns 10..30: red on the left, blue on the right.
    let img = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let out = ImageTransform::EvalCenterCrop
        .apply(&img, 10, &mut Rng::new(0))
        .expect("transform");
    assert_eq!(out.get_pixel(0, 5).0, [255, 0, 0]);
    assert_eq!(out.get_pixel(9, 5).0, [0, 0, 255]);
    let squashed = ImageTransform::EvalSquash
        .apply(&img, 10, &mut Rng::new(0))
        .expect("transform");
    assert_eq!(squashed.get_pixel(0, 5).0, [255, 0, 0]);
    assert_eq!(squashed.get_pixel(2, 5).0, [255, 0, 0]);
}

#[test]
fn jpeg_payloads_match_the_decoded_path_and_draw_the_same_randomness() {
    // Smooth content, so that a DCT-downscaled decode differs little.
    let img = RgbImage::from_fn(512, 384, |x, y| {
        Rgb([(x / 2) as u8, (y * 2 / 3) as u8, ((x + y) / 4) as u8])
    });
    let bytes = encode(DynamicImage::ImageRgb8(img), ImageFormat::Jpeg);
    let decoded = decode_rgb(&bytes, "k").expect("decodes");
    let transforms = [
        ImageTransform::Train(TrainAugment::clipa_strong()),
        ImageTransform::EvalCenterCrop,
        ImageTransform::EvalSquash,
    ];
    for transform in transforms {
        for size in [32u32, 112, 224] {
            let mut aug = Augmenter::new(transform, size);
            let (mut fast, mut slow) = (vec![0; aug.output_len()], vec![0; aug.output_len()]);
            for seed in 0..4 {
                let (mut r1, mut r2) = (Rng::new(seed), Rng::new(seed));
                aug.apply_payload(
                    ImagePayload::Encoded(bytes.clone()),
                    "k",
                    &mut r1,
                    &mut fast,
                )
                .expect("jpeg path");
                aug.apply_into(&decoded, &mut r2, &mut slow)
                    .expect("decoded path");
                assert_eq!(r1.below(1 << 30), r2.below(1 << 30), "same draws");
                let diffs: Vec<u8> = fast
                    .iter()
                    .zip(&slow)
                    .map(|(a, b)| a.abs_diff(*b))
                    .collect();
                let mean = diffs.iter().map(|&d| f64::from(d)).sum::<f64>() / diffs.len() as f64;
                let worst = diffs.iter().max().copied().unwrap_or(0);
                assert!(
                    mean < 2.0 && worst < 24,
                    "{transform:?} at {size}: mean {mean}, worst {worst}"
                );
            }
        }
    }
}

#[test]
fn truncated_or_garbled_jpeg_payloads_are_errors() {
    let bytes = encode(DynamicImage::ImageRgb8(noise(96, 64, 3)), ImageFormat::Jpeg);
    let mut aug = Augmenter::new(ImageTransform::Train(TrainAugment::default()), 16);
    let mut out = vec![0; aug.output_len()];
    let mut rng = Rng::new(0);
    aug.apply_payload(
        ImagePayload::Encoded(bytes.clone()),
        "ok",
        &mut rng,
        &mut out,
    )
    .expect("the intact JPEG decodes");
    for broken in [bytes[..bytes.len() / 2].to_vec(), bytes[..40].to_vec()] {
        let err = aug
            .apply_payload(ImagePayload::Encoded(broken), "bad", &mut rng, &mut out)
            .expect_err("a broken JPEG is a bad sample");
        assert!(err.to_string().contains("bad"), "{err}");
    }
}

#[test]
fn decodes_png_jpeg_webp_grey_and_rgba_to_rgb() {
    let rgb = RgbImage::from_pixel(8, 6, Rgb([10, 120, 240]));
    let png = decode_rgb(
        &encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::Png),
        "a",
    )
    .expect("png");
    assert_eq!(png, rgb);
    let webp = decode_rgb(
        &encode(DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::WebP),
        "b",
    )
    .expect("webp");
    assert_eq!(webp, rgb);
    let jpeg = decode_rgb(
        &encode(DynamicImage::ImageRgb8(rgb), ImageFormat::Jpeg),
        "c",
    )
    .expect("jpeg");
    assert!(
        jpeg.pixels().all(|p| p
            .0
            .iter()
            .zip([10, 120, 240])
            .all(|(&a, b)| a.abs_diff(b) <= 4)),
        "{:?}",
        jpeg.get_pixel(0, 0)
    );
    let grey = image::GrayImage::from_pixel(5, 5, image::Luma([77]));
    let g = decode_rgb(
        &encode(DynamicImage::ImageLuma8(grey), ImageFormat::Png),
        "d",
    )
    .expect("grey");
    assert!(g.pixels().all(|p| p.0 == [77, 77, 77]));
    let rgba = image::RgbaImage::from_pixel(5, 5, image::Rgba([1, 2, 3, 100]));
    let c = decode_rgb(
        &encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png),
        "e",
    )
    .expect("rgba");
    assert!(c.pixels().all(|p| p.0 == [1, 2, 3]));
    let err = decode_rgb(b"not an image", "shard-3/000007").expect_err("garbage");
    assert!(err.to_string().starts_with("shard-3/000007: "), "{err}");
    assert!(payload_rgb(ImagePayload::Decoded(RgbImage::new(0, 4)), "z").is_err());
}
