//! What OpenCLIP users reach for, through the binary: starting from
//! weights (a clipa checkpoint or a hub folder) with their tokenizer and
//! preprocessing, locked towers (LiT) on Fashion-MNIST, and OpenCLIP's
//! optimiser flags in `--dry-run`.

use std::path::Path;

use clipa_core::io::read_safetensors;

use crate::common::{
    assert_one_line_error, clipa, convert_fashion_mnist, fashion_mnist_installed, hub_fixture, s,
    scratch, text,
};

/// The tensors of a safetensors file, by name: (shape, raw bytes).
fn tensors(path: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .tensors
        .into_iter()
        .map(|(k, v)| (k, (v.shape.to_vec(), v.as_bytes().to_vec())))
        .collect()
}

/// OpenCLIP's optimiser flags override every stage, the learning rates
/// are the rates themselves whatever the batch, and `--dry-run` shows the
/// resolved values; values out of range are one-line errors.
#[test]
fn openclip_optimiser_flags_show_in_the_dry_run() {
    let out = clipa(&[
        "train",
        "--preset",
        "demo",
        "--batch-size",
        "96",
        "--lr",
        "5e-4",
        "--wd",
        "0.05",
        "--warmup",
        "7",
        "--beta1",
        "0.8",
        "--beta2",
        "0.98",
        "--eps",
        "1e-6",
        "--grad-clip-norm",
        "1.5",
        "--lr-scheduler",
        "const-cooldown",
        "--cooldown-steps",
        "20",
        "--lr-cooldown-end",
        "1e-5",
        "--lr-cooldown-power",
        "2",
        "--lock-image",
        "--lock-image-unlocked-groups",
        "1",
        "--dry-run",
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let cfg = clipa_core::train::TrainConfig::from_toml(&stdout, Path::new("dry-run.toml"))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let o = &cfg.optimizer;
    assert_eq!(
        (o.beta1, o.beta2, o.eps, o.weight_decay),
        (0.8, 0.98, 1e-6, 0.05)
    );
    assert_eq!(cfg.grad_clip, Some(1.5));
    assert_eq!(cfg.schedule.cooldown_steps, 20);
    assert_eq!(cfg.schedule.cooldown_power, 2.0);
    assert_eq!(cfg.schedule.scheduler.to_string(), "const-cooldown");
    assert_eq!(cfg.lock.image.map(|l| l.unlocked_groups), Some(1));
    assert_eq!(cfg.lock.text, None);
    assert!(
        cfg.stages.len() >= 2,
        "demo has a pre-train and a fine-tune"
    );
    for st in &cfg.stages {
        let peak = st.base_lr * st.batch_size as f64 / 256.0;
        let end = st.end_base_lr * st.batch_size as f64 / 256.0;
        assert!((peak - 5e-4).abs() < 1e-15, "{}: {peak}", st.name);
        assert!((end - 1e-5).abs() < 1e-17, "{}: {end}", st.name);
        assert_eq!(st.warmup_steps, 7);
    }
    // The comment lines say it in words, with the rates after scaling.
    for needle in [
        "# AdamW beta1 0.8 beta2 0.98 eps 1e-6 weight decay 0.05; gradient clip norm 1.5",
        "lr 5.0000e-4",
        "then a cooldown of 20 steps (power 2) to 1.0000e-5",
        "# locked: image tower (all but the top 1 groups)",
    ] {
        assert!(stdout.contains(needle), "{needle}: {stdout}");
    }
    for (flag, v, needle) in [
        ("--lr", "-1", "--lr -1 must be finite and not negative"),
        ("--wd", "nan", "--wd NaN"),
        ("--beta1", "1", "optimizer.beta1 = 1 must be in [0, 1)"),
        ("--beta2", "-0.5", "optimizer.beta2 = -0.5"),
        (
            "--eps",
            "0",
            "optimizer.eps = 0 must be finite and positive",
        ),
        ("--grad-clip-norm", "0", "grad_clip = 0"),
        ("--lr-cooldown-power", "0", "schedule.cooldown_power = 0"),
        (
            "--lr-scheduler",
            "linear",
            "expected cosine, const or const-cooldown",
        ),
        ("--lock-text-unlocked-layers", "9", "--lock-text"),
    ] {
        assert_one_line_error(&["train", "--preset", "tiny", flag, v, "--dry-run"], needle);
    }
    assert_one_line_error(
        &[
            "train",
            "--preset",
            "tiny",
            "--lr-scheduler",
            "const-cooldown",
            "--dry-run",
        ],
        "needs a cooldown",
    );
    assert_one_line_error(
        &[
            "train",
            "--preset",
            "tiny",
            "--lock-text",
            "--lock-text-unlocked-layers",
            "9",
            "--dry-run",
        ],
        "--lock-text-unlocked-layers (lock.text.unlocked_groups) = 9 is out of range: the text tower has",
    );
}

/// LiT on Fashion-MNIST from a clipa checkpoint: the locked image tower's
/// weights are bit-identical after training, while the text tower moves;
/// the optimiser keeps no state for the locked tower; the lock is in the
/// checkpoint, so a resume keeps it (and a resume that changes it is
/// refused); the resumed run ends on the uninterrupted run's weights.
#[test]
fn lit_on_fashion_mnist_keeps_the_locked_tower_bit_identical() {
    if !fashion_mnist_installed("lit_on_fashion_mnist_keeps_the_locked_tower_bit_identical") {
        return;
    }
    let tmp = scratch();
    let dir = tmp.path();
    let data = dir.join("data");
    convert_fashion_mnist(&data, 256, 10, &["--samples-per-shard", "128"]);
    // A clipa checkpoint of the CLIPA-v2-style hub model (WordPiece text).
    let hub = hub_fixture();
    let ckpt = dir.join("ckpt");
    let out = clipa(&["import-openclip", "--dir", s(&hub), "--out", s(&ckpt)]);
    assert!(out.status.success(), "{:?}", text(&out));
    let model_json = hub.join("open_clip_config.json");
    let shards = format!("{}/train/shard-{{000000..000001}}.tar", data.display());
    let train = |run: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "--preset",
            "tiny",
            "--model",
            s(&model_json),
            "--text-length",
            "12",
            "--batch-size",
            "16",
            "--steps",
            "6",
            "--checkpoint-every",
            "3",
            "--workers=1",
            "--train-data",
            &shards,
            "--output",
            s(run),
        ];
        args.extend_from_slice(extra);
        clipa(&args)
    };
    let run = dir.join("run");
    let out = train(&run, &["--init-from", s(&ckpt), "--lock-image"]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("locked: image tower"), "{stderr}");

    let init = tensors(&ckpt.join("model.safetensors"));
    let last = run.join("checkpoints/step-00000006");
    let after = tensors(&last.join("model.safetensors"));
    let (mut visual, mut text_moved) = (0, 0);
    for (name, (shape, bytes)) in &init {
        let (shape2, bytes2) = &after[name];
        assert_eq!(shape, shape2, "{name}");
        if name.starts_with("visual.") {
            assert!(bytes == bytes2, "locked {name} changed");
            visual += 1;
        } else if name.starts_with("text.") && bytes != bytes2 {
            text_moved += 1;
        }
    }
    assert!(visual > 10, "{visual} image-tower tensors compared");
    assert!(text_moved > 10, "only {text_moved} text tensors moved");
    let optim = tensors(&last.join("optimizer.safetensors"));
    assert!(
        !optim.keys().any(|k| k.contains("visual.")),
        "optimiser state for the locked tower: {:?}",
        optim
            .keys()
            .filter(|k| k.contains("visual."))
            .collect::<Vec<_>>()
    );
    assert!(optim.keys().any(|k| k.starts_with("m.text.")));

    // Resume from step 3 with the run's own config: the lock holds, and
    // the weights end where the uninterrupted run's did.
    let cut = dir.join("cut");
    copy_dir(&run, &cut);
    std::fs::remove_dir_all(cut.join("checkpoints/step-00000006")).unwrap();
    let resume = [
        "train",
        "--output",
        s(&cut),
        "--resume",
        "latest",
        "--workers=1",
    ];
    let changed = [&resume[..], &["--lock-text"]].concat();
    assert_one_line_error(&changed, "lock");
    let out = clipa(&resume);
    assert!(out.status.success(), "{}", text(&out).1);
    let resumed = tensors(&cut.join("checkpoints/step-00000006/model.safetensors"));
    assert!(resumed == after, "the resumed run ends on other weights");
}

/// `cp -r src dst`.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &to);
        } else {
            std::fs::copy(&path, &to).unwrap();
        }
    }
}

/// `--init-from` a downloaded hub folder: the run keeps the folder's
/// WordPiece tokenizer and its ImageNet normalisation and squash resize
/// (its checkpoints carry them), and the preset's model must match.
#[test]
fn init_from_a_hub_folder_keeps_its_tokenizer_and_preprocessing() {
    let tmp = scratch();
    let hub = hub_fixture();
    let run = tmp.path().join("run");
    let out = clipa(&[
        "train",
        "--preset",
        "tiny",
        "--model",
        s(&hub.join("open_clip_config.json")),
        "--text-length",
        "12",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--workers=1",
        "--init-from",
        s(&hub),
        "--output",
        s(&run),
    ]);
    let (_, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("initialised from"), "{stderr}");
    let ckpt = run.join("checkpoints/step-00000002");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["normalization"]["mean"][0], 0.485, "{config}");
    assert_eq!(config["eval_resize"], "squash", "{config}");
    assert!(
        config["text"]["tokenizer"]
            .to_string()
            .contains("word_piece")
            || config["text"]["tokenizer"]
                .to_string()
                .to_lowercase()
                .contains("wordpiece"),
        "{config}"
    );
    assert_eq!(
        std::fs::read(ckpt.join("vocab.txt")).unwrap(),
        std::fs::read(hub.join("vocab.txt")).unwrap(),
        "the folder's vocabulary travels with the run"
    );
    // The tokenizer is the folder's: the same ids as OpenCLIP's.
    let ids = |dir: &Path| {
        let out = clipa(&[
            "tokenize",
            "--checkpoint",
            s(dir),
            "--json",
            "a photo of a dog",
        ]);
        assert!(out.status.success(), "{}", text(&out).1);
        text(&out).0
    };
    let imported = tmp.path().join("imported");
    let out = clipa(&["import-openclip", "--dir", s(&hub), "--out", s(&imported)]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(ids(&ckpt), ids(&imported));
    // Against the preset's own model: a named mismatch, before training.
    assert_one_line_error(
        &[
            "train",
            "--preset",
            "tiny",
            "--init-from",
            s(&hub),
            "--output",
            s(&tmp.path().join("other")),
        ],
        "--init-from",
    );
}
