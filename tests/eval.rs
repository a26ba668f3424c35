//! `clipa eval` and `clipa classify` through the binary: the same JSON on
//! cpu and wgpu for an imported OpenCLIP model (zero-shot and retrieval),
//! classify's output, and a real-data run: a tiny model trained on
//! Fashion-MNIST shards scores well above chance on the test split, the
//! same in the image folder and in clip_benchmark's layout.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};

use crate::common::{
    clipa, convert_fashion_mnist, fashion_mnist_installed, fixture_dir, import_fixture,
    import_openclip, s, scratch, skip_or_fail, text,
};

/// Imports the `openai_style` fixture.
fn fixture_checkpoint(dir: &Path) -> PathBuf {
    let ckpt = dir.join("ckpt");
    import_fixture(&fixture_dir("openai_style"), &ckpt);
    ckpt
}

/// A report without what names the checkpoint (clip_benchmark's `model`
/// and `pretrained`, at the top and in `results`): its scores.
fn scores(report: &serde_json::Value) -> serde_json::Value {
    let mut v = report.clone();
    let strip = |o: &mut serde_json::Value| {
        if let Some(o) = o.as_object_mut() {
            o.remove("model");
            o.remove("pretrained");
        }
    };
    strip(&mut v);
    if let Some(results) = v["results"].as_array_mut() {
        results.iter_mut().for_each(strip);
    }
    v
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

/// A 3-class image folder and a CSV of 6 images with 2 captions each.
fn eval_sets(dir: &Path) -> (PathBuf, PathBuf) {
    let colours = [
        ("red", [230, 20, 20]),
        ("green", [20, 200, 40]),
        ("blue", [30, 30, 220]),
    ];
    let folder = dir.join("zs");
    for (name, c) in colours {
        std::fs::create_dir_all(folder.join(name)).unwrap();
        for k in 0..4 {
            picture(c, k)
                .save(folder.join(name).join(format!("{k}.png")))
                .unwrap();
        }
    }
    let mut csv = String::from("filepath,title\n");
    for (i, (name, c)) in colours.iter().cycle().take(6).enumerate() {
        let path = dir.join(format!("r{i}.png"));
        picture(*c, 10 + i as u32).save(&path).unwrap();
        csv += &format!("{},a photo of something {name}\n", path.display());
        csv += &format!("{},a {name} picture number {i}\n", path.display());
    }
    let csv_path = dir.join("captions.csv");
    std::fs::write(&csv_path, csv).unwrap();
    (folder, csv_path)
}

#[test]
fn eval_json_is_the_same_on_cpu_and_wgpu() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let ckpt = fixture_checkpoint(dir);
    let (folder, csv) = eval_sets(dir);
    let args = |backend: &'static str| {
        vec![
            "--backend".to_string(),
            backend.into(),
            "eval".into(),
            "--checkpoint".into(),
            s(&ckpt).into(),
            "--zeroshot-data".into(),
            s(&folder).into(),
            "--templates".into(),
            "simple".into(),
            "--retrieval-data".into(),
            s(&csv).into(),
            "--json".into(),
        ]
    };
    let run = |backend: &'static str| -> serde_json::Value {
        let a = args(backend);
        let out = clipa(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{backend}: {stderr}");
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let cpu = run("cpu");
    assert_eq!(cpu["zeroshot"]["samples"], 12, "{cpu}");
    assert_eq!(cpu["retrieval"]["images"], 6, "{cpu}");
    assert_eq!(cpu["retrieval"]["texts"], 12, "{cpu}");
    assert_eq!(cpu["samples"], 18, "{cpu}");
    for key in ["top1", "top5", "per_class_recall"] {
        let v = cpu["zeroshot"][key].as_f64().expect("a number");
        assert!((0.0..=1.0).contains(&v), "{key} {v}");
    }
    let r1 = cpu["retrieval"]["text_to_image"]["r1"]
        .as_f64()
        .expect("a number");
    assert!((0.0..=1.0).contains(&r1));
    // The classifier was cached beside the checkpoint, and is reused.
    let cached = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("zeroshot-classifier-")
        })
        .count();
    assert_eq!(cached, 1);
    assert_eq!(run("cpu"), cpu, "a second run reads the cache");
    #[cfg(feature = "wgpu")]
    {
        if let Err(err) = clipa_backends::probe(clipa_backends::BackendKind::Wgpu, None) {
            return skip_or_fail("eval_json_is_the_same_on_cpu_and_wgpu", &err.to_string());
        }
        // A fresh checkpoint copy, so that wgpu computes its own classifier.
        let fresh = dir.join("ckpt-wgpu");
        std::fs::create_dir_all(&fresh).unwrap();
        for e in std::fs::read_dir(&ckpt).unwrap().filter_map(Result::ok) {
            if !e
                .file_name()
                .to_string_lossy()
                .starts_with("zeroshot-classifier-")
            {
                std::fs::copy(e.path(), fresh.join(e.file_name())).unwrap();
            }
        }
        let mut a = args("wgpu");
        a[4] = s(&fresh).into();
        let out = clipa(&a.iter().map(String::as_str).collect::<Vec<_>>());
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "wgpu: {stderr}");
        let wgpu: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
        assert_eq!(scores(&wgpu), scores(&cpu), "cpu and wgpu disagree");
    }
}

#[test]
fn eval_uses_the_models_own_resize_unless_told() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let fx = fixture_dir("openai_style");
    let crop = dir.join("crop");
    import_fixture(&fx, &crop);
    // The same weights with a CLIPA-style config: squash, bilinear.
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("model_cfg/CLIPA-tiny-ref.json")).unwrap(),
    )
    .unwrap();
    cfg["vision_cfg"]["resize_mode"] = "squash".into();
    cfg["vision_cfg"]["interpolation"] = "bilinear".into();
    let cfg_path = dir.join("squash.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let squash = dir.join("squash");
    import_openclip(
        &fx.join("openclip_tiny_weights.safetensors"),
        &cfg_path,
        &squash,
    );
    // Two 48×32 images with the same centre square and different 8-pixel
    // edges. A centre crop sees the same pixels, so their features tie and
    // every caption ranks its image second (ties count against the query);
    // a squash sees the edges and breaks the tie.
    let mut csv = String::from("filepath,title\n");
    for (name, edge) in [("red", [230u8, 20, 20]), ("blue", [30, 30, 220])] {
        let img = RgbImage::from_fn(48, 32, |x, y| {
            if (8..40).contains(&x) {
                Rgb([(x * 5) as u8, (y * 7) as u8, 90])
            } else {
                Rgb(edge)
            }
        });
        let path = dir.join(format!("{name}.png"));
        img.save(&path).unwrap();
        csv += &format!("{},a {name} frame\n", path.display());
    }
    let csv_path = dir.join("frames.csv");
    std::fs::write(&csv_path, csv).unwrap();
    let eval = |ckpt: &Path, resize: Option<&str>| -> serde_json::Value {
        let mut a = vec![
            "eval",
            "--checkpoint",
            s(ckpt),
            "--retrieval-data",
            s(&csv_path),
            "--json",
        ];
        if let Some(r) = resize {
            a.extend(["--resize", r]);
        }
        let out = clipa(&a);
        let (stdout, stderr) = text(&out);
        assert!(out.status.success(), "{stderr}");
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let by_crop = eval(&crop, None);
    let by_squash = eval(&squash, None);
    let t2i = |v: &serde_json::Value| {
        v["retrieval"]["text_to_image"]["mean_rank"]
            .as_f64()
            .expect("a mean rank")
    };
    assert_eq!(t2i(&by_crop), 2.0, "tied features: {by_crop}");
    assert!(
        t2i(&by_squash) < 2.0,
        "the edges break the tie: {by_squash}"
    );
    assert_eq!(scores(&eval(&crop, Some("squash"))), scores(&by_squash));
    assert_eq!(
        scores(&eval(&squash, Some("center-crop"))),
        scores(&by_crop)
    );
    let bad = clipa(&["eval", "--checkpoint", s(&crop), "--resize", "stretch"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad).1.contains("expected center-crop or squash"));
}

#[test]
fn classify_prints_each_images_top_labels() {
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let ckpt = fixture_checkpoint(dir);
    let (folder, _) = eval_sets(dir);
    let red = folder.join("red");
    let out = clipa(&[
        "classify",
        "--checkpoint",
        s(&ckpt),
        "--labels",
        "red,green, blue ,",
        "--top",
        "2",
        s(&red),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    for line in lines {
        let (path, labels) = line.split_once(": ").expect("path: labels");
        assert!(path.ends_with(".png"), "{line}");
        let probs: Vec<f64> = labels
            .split(", ")
            .map(|l| {
                let (name, p) = l.rsplit_once(' ').expect("label p%");
                assert!(["red", "green", "blue"].contains(&name), "{line}");
                p.trim_end_matches('%').parse().expect("a percentage")
            })
            .collect();
        assert_eq!(probs.len(), 2, "{line}");
        assert!(
            probs[0] >= probs[1] && probs[0] + probs[1] <= 100.05,
            "{line}"
        );
    }
    let out = clipa(&[
        "classify",
        "--checkpoint",
        s(&ckpt),
        "--labels",
        "cat",
        s(&red),
    ]);
    assert_eq!(out.status.code(), Some(2), "{:?}", text(&out));
}

/// Converts part of Debian's Fashion-MNIST, trains the `tiny` model on it
/// for 300 steps, and evaluates on the test images with `clipa eval`.
#[test]
fn fashion_mnist_tiny_run_scores_well_above_chance() {
    if !fashion_mnist_installed("fashion_mnist_tiny_run_scores_well_above_chance") {
        return;
    }
    let dir_tmp = scratch();
    let dir = dir_tmp.path();
    let data = dir.join("data");
    convert_fashion_mnist(&data, 20000, 2000, &[]);
    let run = dir.join("run");
    let out = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--image-size",
        "28",
        "--text-length",
        "16",
        "--batch-size",
        "64",
        "--steps",
        "300",
        "--log-every",
        "50",
        "--train-data",
        &format!("{}/train/shard-{{000000..000001}}.tar", data.display()),
        "--output",
        s(&run),
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let out = clipa(&[
        "eval",
        "--checkpoint",
        s(&run),
        "--zeroshot-data",
        s(&data.join("test")),
        "--classnames",
        s(&data.join("test/classnames.txt")),
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    let top1 = v["zeroshot"]["top1"].as_f64().expect("top1");
    eprintln!("fashion-mnist tiny run: zero-shot top-1 {top1:.3} (chance 0.1)");
    assert_eq!(v["zeroshot"]["samples"], 2000, "{v}");
    assert!(top1 > 0.35, "top-1 {top1} is not well above chance: {v}");
    // The converter's clip_benchmark copy of the same images, with the
    // same prompts, scores the same.
    let out = clipa(&[
        "eval",
        "--checkpoint",
        s(&run),
        "--zeroshot-data",
        s(&data.join("test-wds")),
        "--templates",
        "photo",
        "--json",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let w: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    eprintln!(
        "fashion-mnist tiny run ({}), clip_benchmark layout: acc1 {}",
        w["model"], w["metrics"]["acc1"]
    );
    for key in ["top1", "top5", "per_class_recall", "samples"] {
        assert_eq!(w["zeroshot"][key], v["zeroshot"][key], "{key}: {w} vs {v}");
    }
    assert_eq!(w["model"], "tiny", "the run's preset: {w}");
}
