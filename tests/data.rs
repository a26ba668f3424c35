//! Bad data on disk through `clipa train`: WebDataset shards written by the
//! test hold a truncated JPEG, an undecodable image and an empty caption;
//! one shard is a truncated tar and one does not exist. Training finishes,
//! and the run summary and the final report count each kind.

use std::io::Cursor;
use std::path::Path;

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage};

use crate::common::{clipa, scratch, text};

/// A 28² JPEG of a keyed colour pattern.
fn jpeg(key: u32) -> Vec<u8> {
    let img = RgbImage::from_fn(28, 28, |x, y| {
        let v = (x * 9 + y * 7 + key * 31) % 256;
        Rgb([v as u8, (v * 3 % 256) as u8, (key * 17 % 256) as u8])
    });
    let mut bytes = Cursor::new(Vec::new());
    JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(&img)
        .expect("encode test image");
    bytes.into_inner()
}

/// Writes a tar of `(name, bytes)` members.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data.as_slice())
            .expect("in-memory tar");
    }
    std::fs::write(path, b.into_inner().expect("in-memory tar")).expect("write shard");
}

/// Ten steps of the tiny preset at 28 px on one worker, from the shards
/// `spec` names, into run folder `run`.
fn train_tiny_on(spec: &str, run: &Path) -> std::process::Output {
    clipa(&[
        "train",
        "--preset",
        "tiny",
        "--image-size",
        "28",
        "--train-data",
        spec,
        "--steps",
        "10",
        "--workers",
        "1",
        "--output",
        run.to_str().expect("utf-8 temp dir"),
    ])
}

/// `n` good samples keyed from `first`.
fn good(first: u32, n: u32) -> Vec<(String, Vec<u8>)> {
    (first..first + n)
        .flat_map(|k| {
            [
                (format!("{k:05}.jpg"), jpeg(k)),
                (
                    format!("{k:05}.txt"),
                    format!("a photo of pattern {}", k % 7).into_bytes(),
                ),
            ]
        })
        .collect()
}

#[test]
fn bad_samples_and_shards_are_skipped_counted_and_reported() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    write_tar(&dir.join("shard-0.tar"), &good(0, 40));
    let mut members = good(100, 40);
    let mut truncated = jpeg(7);
    truncated.truncate(truncated.len() / 2);
    members.extend([
        ("90001.jpg".to_string(), truncated),
        ("90001.txt".to_string(), b"a truncated jpeg".to_vec()),
        ("90002.png".to_string(), b"not a png at all".to_vec()),
        ("90002.txt".to_string(), b"an undecodable image".to_vec()),
        ("90003.jpg".to_string(), jpeg(3)),
        ("90003.txt".to_string(), b"  \n".to_vec()),
    ]);
    write_tar(&dir.join("shard-1.tar"), &members);
    // A shard cut off mid-way: the samples before the cut are used.
    let cut = dir.join("shard-2.tar");
    write_tar(&cut, &good(200, 40));
    let bytes = std::fs::read(&cut).expect("read shard");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("truncate shard");
    // shard-3.tar is never written.
    let spec = format!("{}/shard-{{0..3}}.tar", dir.display());
    let run = dir.join("run");
    let out = train_tiny_on(&spec, &run);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("summary.json")).expect("summary.json"),
    )
    .expect("summary JSON");
    let data = &summary["data"];
    let count = |k: &str| data[k].as_u64().unwrap_or_else(|| panic!("{k} in {data}"));
    // 10 steps of 16 samples read each shard at least once: every bad
    // sample and both bad shards are met, and counted once per reading.
    assert!(count("bad_images") >= 2, "{data}");
    assert!(count("bad_captions") >= 1, "{data}");
    assert!(count("bad_shards") >= 2, "{data}");
    assert!(count("samples") >= 160, "{data}");
    assert!(
        stdout.contains("skipped data:") && stdout.contains("bad shards"),
        "{stdout}"
    );
}

/// A short run on 48 samples, every other caption blank: the bad share
/// (a half) is judged from the first batch on what was read, and the run
/// stops with exit 2, naming the counts, where it used to finish with
/// "64 bad captions (of 48 samples)".
#[test]
fn much_bad_data_stops_a_short_run() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let members: Vec<(String, Vec<u8>)> = good(0, 48)
        .into_iter()
        .map(|(name, bytes)| {
            let key: u32 = name[..5].parse().expect("keyed member");
            match name.ends_with(".txt") && key.is_multiple_of(2) {
                true => (name, b" ".to_vec()),
                false => (name, bytes),
            }
        })
        .collect();
    write_tar(&dir.join("shard-0.tar"), &members);
    let run = dir.join("run");
    let shard = dir.join("shard-0.tar");
    let out = train_tiny_on(shard.to_str().expect("utf-8 temp dir"), &run);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("unusable") && stderr.contains("max_bad_fraction"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
