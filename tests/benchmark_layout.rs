//! clip_benchmark's WebDataset layout through `clipa eval`: Fashion-MNIST's
//! test split converted to it scores as the image folder does, a retrieval
//! set with several captions per image reads as its CSV does, the JSON
//! carries clip_benchmark's result keys, and a class-names file that lists
//! the folders in another order maps labels by name.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use serde_json::Value;

use crate::common::{
    clipa, convert_fashion_mnist, fashion_mnist_installed, fixture_dir, import_fixture, s, scratch,
    text,
};

/// Imports the `openai_style` fixture into `dir/ckpt`.
fn checkpoint(dir: &Path) -> PathBuf {
    let ckpt = dir.join("ckpt");
    import_fixture(&fixture_dir("openai_style"), &ckpt);
    ckpt
}

/// `clipa eval --checkpoint CKPT ARGS… --json`, which must succeed: the
/// report and stderr.
fn eval_json(ckpt: &Path, args: &[&str]) -> (Value, String) {
    let out = clipa(&[&["eval", "--checkpoint", s(ckpt)], args, &["--json"]].concat());
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{args:?}: {stderr}");
    let v = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (v, stderr)
}

/// The zero-shot scores of a report.
fn zeroshot_scores(v: &Value) -> [Value; 5] {
    let z = &v["zeroshot"];
    ["top1", "top5", "per_class_recall", "samples", "classes"].map(|k| z[k].clone())
}

/// Converts 250 of Fashion-MNIST's test images (one evaluation batch) and
/// evaluates the image folder and the clip_benchmark copy: the same
/// scores, whichever way the copy is named.
#[test]
fn fashion_mnist_benchmark_layout_scores_as_the_folder() {
    if !fashion_mnist_installed("fashion_mnist_benchmark_layout_scores_as_the_folder") {
        return;
    }
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let data = dir.join("data");
    convert_fashion_mnist(&data, 10, 250, &[]);
    let wds = data.join("test-wds");
    for f in [
        "classnames.txt",
        "zeroshot_classification_templates.txt",
        "test/nshards.txt",
        "test/0.tar",
    ] {
        assert!(wds.join(f).is_file(), "{f} missing");
    }
    let ckpt = checkpoint(dir);
    let test = data.join("test");
    let (folder, _) = eval_json(
        &ckpt,
        &[
            "--zeroshot-data",
            s(&test),
            "--classnames",
            s(&test.join("classnames.txt")),
            "--templates",
            s(&test.join("templates.txt")),
        ],
    );
    let (bench, _) = eval_json(&ckpt, &["--zeroshot-data", s(&wds)]);
    assert_eq!(folder["zeroshot"]["samples"], 250, "{folder}");
    assert_eq!(
        zeroshot_scores(&bench),
        zeroshot_scores(&folder),
        "{bench} vs {folder}"
    );
    eprintln!(
        "fashion-mnist, 250 test images: top-1 {} both as a folder and in clip_benchmark's layout",
        bench["zeroshot"]["top1"]
    );
    // The split flag, the split folder and a shard pattern read the same.
    let pattern = format!("{}/test/{{0..0}}.tar", wds.display());
    for args in [
        vec!["--zeroshot-data", s(&wds), "--split", "test"],
        vec!["--zeroshot-data", s(&wds.join("test"))],
        vec!["--zeroshot-data", &pattern],
    ] {
        let (v, _) = eval_json(&ckpt, &args);
        assert_eq!(
            zeroshot_scores(&v),
            zeroshot_scores(&folder),
            "{args:?}: {v}"
        );
        assert_eq!(v["dataset"], "test-wds", "{v}");
    }
    // clip_benchmark's result keys, beside clipa's own.
    assert_eq!(bench["dataset"], "test-wds");
    assert_eq!(folder["dataset"], "test");
    assert_eq!(bench["task"], "zeroshot_classification");
    assert_eq!(bench["language"], "en");
    assert_eq!(bench["pretrained"], s(&ckpt));
    assert!(
        bench["model"].as_str().is_some_and(|m| !m.is_empty()),
        "{bench}"
    );
    let m = &bench["metrics"];
    assert_eq!(m["acc1"], bench["zeroshot"]["top1"]);
    assert_eq!(m["acc5"], bench["zeroshot"]["top5"]);
    assert_eq!(
        m["mean_per_class_recall"],
        bench["zeroshot"]["per_class_recall"]
    );
    assert_eq!(
        bench["results"].as_array().map(Vec::len),
        Some(1),
        "{bench}"
    );
    assert_eq!(bench["results"][0]["metrics"], *m);
    // A split that is not there is a one-line mistake.
    let out = clipa(&[
        "eval",
        "--checkpoint",
        s(&ckpt),
        "--zeroshot-data",
        s(&wds),
        "--split",
        "train",
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("with a `train` split"), "{stderr}");
}

/// A keyed 40×32 image: a colour with a gradient.
fn picture(colour: [u8; 3], key: u32) -> RgbImage {
    RgbImage::from_fn(40, 32, |x, y| {
        Rgb([
            colour[0] ^ (x * 3 + key) as u8,
            colour[1] ^ (y * 5) as u8,
            colour[2] ^ (key * 29) as u8,
        ])
    })
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .expect("encode png");
    bytes.into_inner()
}

/// Writes a tar of `(name, bytes)` members.
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice())
            .expect("in-memory tar");
    }
    std::fs::write(path, b.into_inner().expect("in-memory tar")).expect("write shard");
}

/// Six images with two captions each, as a clip_benchmark retrieval set in
/// two shards and as a CSV: the same retrieval, and clip_benchmark's
/// recall keys.
#[test]
fn benchmark_retrieval_set_reads_several_captions_per_image() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let ckpt = checkpoint(dir);
    let root = dir.join("wds_colours");
    std::fs::create_dir_all(root.join("test")).unwrap();
    std::fs::write(root.join("dataset_type.txt"), "retrieval\n").unwrap();
    let colours = [
        ("red", [230, 20, 20]),
        ("green", [20, 200, 40]),
        ("blue", [30, 30, 220]),
    ];
    let mut csv = String::from("filepath,title\n");
    let mut shards = [Vec::new(), Vec::new()];
    for (i, (name, c)) in colours.iter().cycle().take(6).enumerate() {
        let img = picture(*c, 10 + i as u32);
        let path = dir.join(format!("r{i}.png"));
        img.save(&path).unwrap();
        let captions = [
            format!("a photo of something {name}"),
            format!("a {name} picture number {i}"),
        ];
        for c in &captions {
            csv += &format!("{},{c}\n", path.display());
        }
        let key = format!("s{i:07}");
        shards[i / 3].push((format!("{key}.png"), png(&img)));
        shards[i / 3].push((format!("{key}.txt"), captions.join("\n").into_bytes()));
    }
    for (k, members) in shards.iter().enumerate() {
        write_tar(&root.join(format!("test/{k}.tar")), members);
    }
    std::fs::write(root.join("test/nshards.txt"), "2\n").unwrap();
    let csv_path = dir.join("captions.csv");
    std::fs::write(&csv_path, csv).unwrap();

    let (bench, _) = eval_json(&ckpt, &["--retrieval-data", s(&root)]);
    let (by_csv, _) = eval_json(&ckpt, &["--retrieval-data", s(&csv_path)]);
    assert_eq!(bench["retrieval"]["images"], 6, "{bench}");
    assert_eq!(bench["retrieval"]["texts"], 12, "{bench}");
    assert_eq!(bench["retrieval"], by_csv["retrieval"]);
    assert_eq!(bench["dataset"], "wds_colours");
    assert_eq!(by_csv["dataset"], "captions");
    assert_eq!(bench["task"], "zeroshot_retrieval");
    let r = &bench["retrieval"];
    for k in [1, 5, 10] {
        let m = &bench["metrics"];
        assert_eq!(
            m[format!("image_retrieval_recall@{k}")],
            r["text_to_image"][format!("r{k}")],
            "{bench}"
        );
        assert_eq!(
            m[format!("text_retrieval_recall@{k}")],
            r["image_to_text"][format!("r{k}")],
            "{bench}"
        );
    }
    let (split, _) = eval_json(&ckpt, &["--retrieval-data", s(&root), "--split", "test"]);
    assert_eq!(split["retrieval"], bench["retrieval"]);
}

/// Folders `red/` and `blue/` (sorted: blue is label 0) with a class-names
/// file `red, blue`: labels follow the file, as a warning says, and score
/// as the file in folder order does.
#[test]
fn class_names_in_another_order_map_by_name() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let ckpt = checkpoint(dir);
    let folder = dir.join("zs");
    for (name, c) in [("red", [230, 20, 20]), ("blue", [30, 30, 220])] {
        std::fs::create_dir_all(folder.join(name)).unwrap();
        for k in 0..4 {
            picture(c, k)
                .save(folder.join(name).join(format!("{k}.png")))
                .unwrap();
        }
    }
    let sorted = dir.join("sorted.txt");
    std::fs::write(&sorted, "blue\nred\n").unwrap();
    let swapped = dir.join("swapped.txt");
    std::fs::write(&swapped, "red\nblue\n").unwrap();
    let run = |names: &Path| {
        eval_json(
            &ckpt,
            &[
                "--zeroshot-data",
                s(&folder),
                "--classnames",
                s(names),
                "--templates",
                "simple",
            ],
        )
    };
    let (by_order, quiet) = run(&sorted);
    let (by_name, said) = run(&swapped);
    assert!(
        said.contains(
            "class names file lists the folders in another order: labels follow the file"
        ),
        "{said}"
    );
    assert!(!quiet.contains("another order"), "{quiet}");
    assert_eq!(
        by_name["zeroshot"]["top1"], by_order["zeroshot"]["top1"],
        "{by_name}"
    );
    assert_eq!(
        by_name["zeroshot"]["per_class_recall"],
        by_order["zeroshot"]["per_class_recall"]
    );
    assert_eq!(by_name["zeroshot"]["samples"], 8);
    // Two classes: clip_benchmark has no top-5 (NaN), clipa writes null.
    assert_eq!(by_name["metrics"]["acc5"], Value::Null, "{by_name}");
}
