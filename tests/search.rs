//! `clipa search` through the binary: by text and by image, against the
//! images and the captions of an `embed` file, equal to a brute-force
//! top-k over that file; one-line errors for a bad index and `--top 0`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use clipa_core::io::{read_safetensors, write_safetensors};
use clipa_core::state::StateDict;

use crate::common::{clipa, fixture_dir, import_fixture, s, scratch, text};

/// A checkpoint (the tiny OpenCLIP fixture), six images and five captions
/// in `tmp`, embedded by `clipa embed` into `tmp/index.safetensors`.
/// Returns the checkpoint, the image files and the index.
fn embedded(tmp: &Path) -> (PathBuf, Vec<PathBuf>, PathBuf) {
    let ckpt = tmp.join("ckpt");
    import_fixture(&fixture_dir("openai_style"), &ckpt);
    let dir = tmp.join("images");
    std::fs::create_dir_all(&dir).unwrap();
    let images: Vec<PathBuf> = (0..6u32)
        .map(|i| {
            let img = image::RgbImage::from_fn(40, 40, |x, y| {
                image::Rgb([
                    (x * (i + 1) * 7) as u8,
                    (y * (6 - i) * 5) as u8,
                    ((x + y) * i * 3) as u8,
                ])
            });
            let path = dir.join(format!("img{i}.png"));
            img.save(&path).unwrap();
            path
        })
        .collect();
    let captions = tmp.join("captions.txt");
    std::fs::write(
        &captions,
        "a dog\na red square\na photo of a cat\nblue and green stripes\nnothing\n",
    )
    .unwrap();
    let index = tmp.join("index.safetensors");
    let out = clipa(&[
        "embed",
        "--checkpoint",
        s(&ckpt),
        "--images",
        s(&dir),
        "--texts",
        s(&captions),
        "--out",
        s(&index),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    (ckpt, images, index)
}

/// The rows of matrix `name` of an `embed` file.
fn rows(index: &Path, name: &str) -> Vec<Vec<f32>> {
    let file = read_safetensors(index).unwrap();
    let m = &file.tensors[name];
    let dim = m.shape[1];
    m.to_vec::<f32>()
        .unwrap()
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Every row scored against `query` and fully sorted (higher score first,
/// then lower row), cut to `k`: `(index, score)`.
fn brute_force(rows: &[Vec<f32>], query: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut all: Vec<(usize, f32)> = rows
        .iter()
        .map(|r| r.iter().zip(query).map(|(a, b)| a * b).sum())
        .enumerate()
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

/// `clipa search --json` with `args`, which must succeed.
fn search(args: &[&str]) -> serde_json::Value {
    let out = clipa(&[&["search", "--json"], args].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The results of a search report, checked against `want` and `names`.
fn assert_results(report: &serde_json::Value, want: &[(usize, f32)], names: &[String]) {
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), want.len(), "{report}");
    for (rank, (got, (index, score))) in results.iter().zip(want).enumerate() {
        assert_eq!(got["rank"], rank + 1);
        assert_eq!(got["index"], *index, "{report}");
        let got_score = got["score"].as_f64().unwrap();
        assert!((got_score - f64::from(*score)).abs() < 1e-5, "{report}");
        assert_eq!(got["name"], names[*index]);
    }
}

#[test]
fn search_by_text_and_by_image_equals_a_brute_force_top_k() {
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let (ckpt, images, index) = embedded(tmp);
    let (image_rows, text_rows) = (
        rows(&index, "image_features"),
        rows(&index, "text_features"),
    );
    let meta = read_safetensors(&index).unwrap().metadata;
    let image_names: Vec<String> = serde_json::from_str(&meta["image_names"]).unwrap();
    let captions: Vec<String> = serde_json::from_str(&meta["texts"]).unwrap();
    let base = ["--checkpoint", s(&ckpt), "--index", s(&index)];

    // By text, against the images (the default): the query embeds as its
    // caption did.
    let report = search(&[&base[..], &["--text", "a photo of a cat", "--top", "4"]].concat());
    assert_eq!(report["query"]["text"], "a photo of a cat");
    assert_eq!(
        (report["against"].as_str(), report["top"].as_u64()),
        (Some("images"), Some(4))
    );
    assert_results(
        &report,
        &brute_force(&image_rows, &text_rows[2], 4),
        &image_names,
    );

    // By image, against the images: the image itself comes first.
    let report = search(&[&base[..], &["--image", s(&images[3]), "--top", "3"]].concat());
    let want = brute_force(&image_rows, &image_rows[3], 3);
    assert_eq!(want[0].0, 3);
    assert_results(&report, &want, &image_names);

    // By image, against the captions, asking for more than there are.
    let args = [
        "--image",
        s(&images[1]),
        "--against",
        "texts",
        "--top",
        "20",
    ];
    let report = search(&[&base[..], &args].concat());
    assert_eq!(report["against"], "texts");
    assert_results(
        &report,
        &brute_force(&text_rows, &image_rows[1], 20),
        &captions,
    );

    // The table: a header and one line per result, best first.
    let out = clipa(&[&["search"], &base[..], &["--text", "a dog", "--top", "2"]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with("rank") && lines[1].trim_start().starts_with("1 "),
        "{stdout}"
    );
    let best = brute_force(&image_rows, &text_rows[0], 1)[0].0;
    assert!(lines[1].ends_with(&image_names[best]), "{stdout}");
}

#[test]
fn search_mistakes_are_one_line_errors() {
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let (ckpt, _, index) = embedded(tmp);
    // An index of another width, as another checkpoint would write.
    let narrow = tmp.join("narrow.safetensors");
    let mut sd = StateDict::new();
    sd.insert(
        "image_features".into(),
        TensorData::new(vec![0.25f32; 3 * 16], [3, 16]),
    );
    write_safetensors(&narrow, &sd, HashMap::new()).unwrap();
    let missing = tmp.join("missing.safetensors");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--index", s(&missing), "--text", "a dog"],
            "missing.safetensors",
        ),
        (
            &["--index", s(&index), "--text", "a dog", "--top", "0"],
            "--top must be positive",
        ),
        (
            &["--index", s(&narrow), "--text", "a dog"],
            "narrow.safetensors: the query has 64 values",
        ),
        (
            &["--index", s(&narrow), "--text", "a", "--against", "texts"],
            "no text_features",
        ),
        (
            &["--index", s(&index), "--text", "a", "--image", s(&index)],
            "cannot be used with",
        ),
    ];
    for (args, want) in cases {
        let out = clipa(&[&["search", "--checkpoint", s(&ckpt)], args].concat());
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
}
