//! OpenCLIP weights through the binary: import, export bit for bit, embed,
//! and the `models` table.

use clipa_core::io::read_safetensors;

use crate::common::{clipa, fixture_dir, import_fixture, s, scratch, text};

#[test]
fn import_then_export_is_bit_exact() {
    for name in ["openai_style", "clipa_style"] {
        let fx = fixture_dir(name);
        let tmp_tmp = scratch();
        let tmp = tmp_tmp.path();
        let (ckpt, exported) = (tmp.join("ckpt"), tmp.join("back.safetensors"));
        let weights = import_fixture(&fx, &ckpt);
        let out = clipa(&[
            "export-openclip",
            "--checkpoint",
            s(&ckpt),
            "--out",
            s(&exported),
        ]);
        assert!(out.status.success(), "{:?}", text(&out));
        let original = read_safetensors(&weights).unwrap().tensors;
        let back = read_safetensors(&exported).unwrap().tensors;
        assert_eq!(original.len(), back.len(), "{name}: tensor count");
        for (key, want) in &original {
            let got = &back[key];
            assert_eq!(got.shape, want.shape, "{name}: {key} shape");
            assert_eq!(got.as_bytes(), want.as_bytes(), "{name}: {key} bits");
        }
    }
}

#[test]
fn import_errors_name_the_problem() {
    let fx = fixture_dir("openai_style");
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let weights = fx.join("openclip_tiny_weights.safetensors");
    // A config that does not describe these weights: every mismatch is named.
    let cfg = std::fs::read_to_string(fx.join("model_cfg/CLIPA-tiny-ref.json"))
        .unwrap()
        .replace("\"embed_dim\": 64", "\"embed_dim\": 32");
    let bad_cfg = tmp.join("bad.json");
    std::fs::write(&bad_cfg, cfg).unwrap();
    let out = clipa(&[
        "import-openclip",
        "--weights",
        s(&weights),
        "--config",
        s(&bad_cfg),
        "--out",
        s(&tmp.join("x")),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("tensor visual.proj has shape [64, 64], the config expects [64, 32]"),
        "{stderr}"
    );
    // A PyTorch file that is not a checkpoint is named, not a panic.
    let pickle = tmp.join("model.bin");
    std::fs::write(&pickle, b"\x80\x04\x95 pickle").unwrap();
    let config = fx.join("model_cfg/CLIPA-tiny-ref.json");
    let out = clipa(&[
        "import-openclip",
        "--weights",
        s(&pickle),
        "--config",
        s(&config),
        "--out",
        s(&tmp.join("y")),
    ]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("model.bin: "), "{stderr}");
    assert!(!tmp.join("y").exists(), "nothing written");
}

#[test]
fn embed_writes_unit_features_in_input_order() {
    let fx = fixture_dir("openai_style");
    let tmp_tmp = scratch();
    let tmp = tmp_tmp.path();
    let ckpt = tmp.join("ckpt");
    import_fixture(&fx, &ckpt);
    let images = tmp.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (i, colour) in [[255u8, 0, 0], [0, 255, 0], [0, 0, 255]].iter().enumerate() {
        let img = image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([
                colour[0] ^ (x as u8 * 5),
                colour[1] ^ (y as u8 * 3),
                colour[2],
            ])
        });
        // The last one as WebP in a subfolder: folders are searched
        // recursively, as the loader reads them.
        let path = match i {
            2 => images.join("sub/img2.webp"),
            _ => images.join(format!("img{i}.png")),
        };
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        img.save(path).unwrap();
    }
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let feats = tmp.join("f.safetensors");
    let out = clipa(&[
        "embed",
        "--checkpoint",
        s(&ckpt),
        "--images",
        s(&images),
        "--out",
        s(&feats),
        "--batch-size",
        "2",
    ]);
    assert!(out.status.success(), "{:?}", text(&out));
    let file = read_safetensors(&feats).unwrap();
    let f = &file.tensors["image_features"];
    assert_eq!(f.shape.as_slice(), &[3, 64]);
    let v = f.to_vec::<f32>().unwrap();
    for row in v.chunks(64) {
        let norm: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row norm {norm}");
    }
    assert_ne!(v[..64], v[64..128], "different images, different features");
    let names: Vec<String> = serde_json::from_str(&file.metadata["image_names"]).unwrap();
    assert!(
        names[0].ends_with("img0.png") && names[2].ends_with("sub/img2.webp"),
        "{names:?}"
    );
    // The checkpoint's tokenizer (CLIP BPE): `open_clip.tokenize(text, 10)`.
    let out = clipa(&[
        "tokenize",
        "--checkpoint",
        s(&ckpt),
        "--context-length",
        "10",
        "a photo of a cat.",
        "",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stdout,
        "49406 320 1125 539 320 2368 269 49407 0 0\n49406 49407 0 0 0 0 0 0 0 0\n"
    );
}

#[test]
fn models_lists_presets_with_openclip_gflops() {
    let out = clipa(&["models", "--json"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let models = v["models"].as_array().unwrap();
    let find = |n: &str| {
        models
            .iter()
            .find(|m| m["name"] == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    // OpenCLIP docs/model_profile.csv: forward GFLOPs per sample.
    for (name, want) in [
        ("vit-b16", 41.09),
        ("vit-l14", 175.33),
        ("clipa-h14", 354.02),
    ] {
        let got = find(name)["total_gflops"].as_f64().unwrap();
        assert!((got - want).abs() / want < 0.05, "{name}: {got} vs {want}");
    }
    let bench = find("bench-tiny")["params_m"].as_f64().unwrap();
    assert!((bench - 19.14).abs() < 0.01, "{bench}");
    let table = clipa(&["models"]);
    let (stdout, _) = text(&table);
    // CLIPA-v1's three PyTorch models and CLIPA-v2's six JAX ones.
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("clipa-")).count(),
        9,
        "{stdout}"
    );
}
