//! Tests of `config`.

use super::*;

#[test]
fn every_preset_is_valid_and_named() {
    for name in PRESETS {
        let cfg = ClipConfig::preset(name).unwrap();
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        ClipConfig::preset("vit-z99")
            .unwrap_err()
            .to_string()
            .contains("presets: clipa-v1-b16")
    );
}

#[test]
fn validate_rejects_bad_sizes() {
    let mut cfg = ClipConfig::tiny();
    cfg.vision.image_size = 30;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("not a multiple of patch size 4")
    );
    let mut cfg = ClipConfig::tiny();
    cfg.text.heads = 3;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("text: heads (3)")
    );
}

#[test]
fn each_paper_version_has_its_tokenizer() {
    for v1 in ["clipa-v1-b16", "clipa-v1-l16", "clipa-v1-h14"] {
        let t = ClipConfig::preset(v1).unwrap().text;
        assert_eq!(t.tokenizer, TokenizerConfig::ClipBpe, "{v1}");
        assert_eq!(
            (t.vocab_size, t.causal, t.pool),
            (CLIP_VOCAB, true, TextPool::Argmax)
        );
    }
    for v2 in [
        "clipa-s16",
        "clipa-b16",
        "clipa-l14",
        "clipa-l16",
        "clipa-h14",
        "clipa-g14",
    ] {
        let t = ClipConfig::preset(v2).unwrap().text;
        assert_eq!(t.tokenizer, TokenizerConfig::BERT_UNCASED, "{v2}");
        assert_eq!(
            (t.vocab_size, t.causal, t.pool),
            (BERT_VOCAB, false, TextPool::Last)
        );
    }
    // The v1 L/16 and H/14 pool over CLS and patches; B/16 takes CLS.
    assert_eq!(ClipConfig::clipa_v1_b16().vision.pool, VisionPool::Cls);
    assert_eq!(ClipConfig::clipa_v1_l16().vision.pool, VisionPool::AvgAll);
    let mut bad = ClipConfig::tiny();
    bad.text.vocab_size = 32_000;
    let err = bad.validate().unwrap_err().to_string();
    assert!(err.contains("CLIP BPE emits ids up to 49407"), "{err}");
}

#[test]
fn config_round_trips_through_json() {
    let cfg = ClipConfig::clipa_h14();
    let json = serde_json::to_string(&cfg).unwrap();
    let back: ClipConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
}
