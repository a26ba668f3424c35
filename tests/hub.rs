//! Released CLIPA models as users download them: an OpenCLIP hub folder
//! (CLIPA-v2 style: BERT WordPiece, `strip_sep_token`, squash resize)
//! imported whole, from safetensors or the PyTorch pickle, then `embed` and
//! `tokenize` against OpenCLIP's own outputs; and pickles that would run code.

use std::path::{Path, PathBuf};

use clipa_core::io::read_safetensors;

use crate::common::{clipa, hub_fixture, s, scratch, text};

/// A copy of the fixture folder without `drop`, plus `extra` files.
fn copy_without(fx: &Path, to: &Path, drop: &[&str]) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(fx).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if path.is_file() && !drop.contains(&name.as_str()) {
            std::fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// `clipa import-openclip ARGS… --out out`, which must succeed.
fn import(args: &[&str], out: &Path) {
    let mut all = vec!["import-openclip"];
    all.extend_from_slice(args);
    all.extend(["--out", s(out)]);
    let run = clipa(&all);
    assert!(run.status.success(), "{:?}", text(&run));
}

/// The reference captions, one a line, in `dir/captions.txt`.
fn captions_file(fx: &Path, dir: &Path) -> PathBuf {
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    let captions: Vec<&str> = reference["captions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let path = dir.join("captions.txt");
    std::fs::write(&path, captions.join("\n") + "\n").unwrap();
    path
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Embeds the fixture's images and captions with `ckpt` on `backend` and
/// holds the features to OpenCLIP's within 1e-5, and the token ids to
/// OpenCLIP's exactly.
fn assert_matches_openclip(fx: &Path, ckpt: &Path, backend: &str, tmp: &Path) {
    let reference = read_safetensors(&fx.join("reference.safetensors"))
        .unwrap()
        .tensors;
    let captions = captions_file(fx, tmp);
    let feats = tmp.join(format!("feats-{backend}.safetensors"));
    let run = clipa(&[
        "--backend",
        backend,
        "embed",
        "--checkpoint",
        s(ckpt),
        "--images",
        s(&fx.join("images")),
        "--texts",
        s(&captions),
        "--out",
        s(&feats),
    ]);
    assert!(run.status.success(), "{:?}", text(&run));
    let got = read_safetensors(&feats).unwrap();
    for key in ["image_features", "text_features"] {
        let (g, w) = (&got.tensors[key], &reference[key]);
        assert_eq!(g.shape, w.shape, "{backend} {key}");
        let d = max_abs_diff(&g.to_vec::<f32>().unwrap(), &w.to_vec::<f32>().unwrap());
        assert!(d <= 1e-5, "{backend} {key}: max |diff| {d:.2e}");
        eprintln!("{backend} {key}: within {d:.1e} of OpenCLIP");
    }
    let run = clipa(&[
        "tokenize",
        "--checkpoint",
        s(ckpt),
        "--texts",
        s(&captions),
        "--json",
    ]);
    assert!(run.status.success(), "{:?}", text(&run));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let ids: Vec<i64> = report["ids"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()))
        .collect();
    assert_eq!(ids, reference["token_ids"].to_vec::<i64>().unwrap());
}

/// Whether the wgpu backend has an adapter here; prints why not.
fn wgpu_available(test: &str) -> bool {
    match clipa_backends::probe(clipa_backends::BackendKind::Wgpu, None) {
        Ok(_) => true,
        Err(err) => {
            crate::common::skip_or_fail(test, &err.to_string());
            false
        }
    }
}

#[test]
fn a_hub_folder_matches_openclip_from_safetensors_and_from_the_pickle() {
    let fx = hub_fixture();
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    // The folder as downloaded (safetensors), the same folder with only the
    // pickle (the newer CLIPA releases), and loose files with --vocab.
    let pickle_only = tmp.join("pickle-only");
    copy_without(&fx, &pickle_only, &["open_clip_model.safetensors"]);
    let (a, b, c) = (tmp.join("a"), tmp.join("b"), tmp.join("c"));
    import(&["--dir", s(&fx)], &a);
    import(&["--dir", s(&pickle_only)], &b);
    import(
        &[
            "--weights",
            s(&fx.join("open_clip_pytorch_model.bin")),
            "--config",
            s(&fx.join("open_clip_config.json")),
            "--vocab",
            s(&fx.join("tokenizer.json")),
        ],
        &c,
    );
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(weights(&a), weights(&b), "pickle and safetensors agree");
    assert_eq!(weights(&a), weights(&c));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["text"]["tokenizer"]["kind"], "word_piece");
    assert_eq!(config["text"]["tokenizer"]["strip_sep_token"], true);
    assert_eq!(config["eval_resize"], "squash");
    assert_matches_openclip(&fx, &a, "cpu", tmp);
    assert_matches_openclip(&fx, &b, "cpu", tmp);
    if wgpu_available("a_hub_folder_matches_openclip_from_safetensors_and_from_the_pickle") {
        assert_matches_openclip(&fx, &a, "wgpu", tmp);
    }
}

#[test]
fn a_malicious_pickle_is_refused_and_nothing_is_written() {
    let fx = hub_fixture();
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let folder = tmp.join("evil-folder");
    copy_without(&fx, &folder, &["open_clip_model.safetensors"]);
    std::fs::copy(
        fx.join("evil_pickle.bin"),
        folder.join("open_clip_pytorch_model.bin"),
    )
    .unwrap();
    let out = tmp.join("ckpt");
    let (evil, config, vocab) = (
        fx.join("evil_pickle.bin"),
        fx.join("open_clip_config.json"),
        fx.join("vocab.txt"),
    );
    let loose = ["--weights", s(&evil), "--config", s(&config)];
    for args in [&["--dir", s(&folder)][..], &loose[..]] {
        // In the scratch folder, where the payload would leave its file.
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_clipa"))
            .arg("import-openclip")
            .args(args)
            .args(["--vocab", s(&vocab), "--out", s(&out)])
            .current_dir(tmp as &Path)
            .output()
            .unwrap();
        let (_, stderr) = text(&run);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains("pickle global posix.system is refused"),
            "{stderr}"
        );
        assert!(!out.exists(), "no checkpoint written");
    }
    // The pickle's payload would have created this file in the working folder.
    assert!(!tmp.join("evil-pickle-ran").exists());
}

#[test]
fn a_hub_folder_missing_a_piece_is_a_named_error() {
    let fx = hub_fixture();
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let cases: [(&str, &[&str], &str); 3] = [
        (
            "no-tokenizer",
            &["vocab.txt", "tokenizer.json"],
            "has neither vocab.txt nor tokenizer.json",
        ),
        (
            "no-weights",
            &["open_clip_model.safetensors", "open_clip_pytorch_model.bin"],
            "neither open_clip_model.safetensors nor open_clip_pytorch_model.bin",
        ),
        (
            "no-config",
            &["open_clip_config.json"],
            "no open_clip_config.json",
        ),
    ];
    for (name, drop, says) in cases {
        let folder = tmp.join(name);
        copy_without(&fx, &folder, drop);
        let out = clipa(&[
            "import-openclip",
            "--dir",
            s(&folder),
            "--out",
            s(&tmp.join("ckpt")),
        ]);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
    }
    // A vocabulary with more ids than the embedding has rows (256 here).
    let long = tmp.join("long-vocab.txt");
    let mut vocab = std::fs::read_to_string(fx.join("vocab.txt")).unwrap();
    vocab.extend((0..200).map(|i| format!("extra{i}\n")));
    std::fs::write(&long, vocab).unwrap();
    let out = clipa(&[
        "import-openclip",
        "--dir",
        s(&fx),
        "--vocab",
        s(&long),
        "--out",
        s(&tmp.join("ckpt")),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("tokenizer and model do not match") && stderr.contains("256 rows"),
        "{stderr}"
    );
    assert!(!tmp.join("ckpt").exists());
}
