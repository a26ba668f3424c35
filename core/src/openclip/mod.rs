//! OpenCLIP interoperability: model-config JSON and state-dict key mapping,
//! both directions, and importing downloaded hub folders.
//!
//! Key layout follows OpenCLIP's `CLIP` (and `CustomTextCLIP` when
//! `custom_text` is set, which nests the text tower under `text.`).
//! Differences handled here:
//! - `attn.in_proj_weight` `[3w, w]` is split into clipa's q/k/v weights;
//! - every `nn.Linear` weight is `[out, in]` in PyTorch and `[in, out]` in
//!   clipa, so it is transposed; `visual.proj` and `text_projection` are
//!   plain `[in, out]` matrices in both;
//! - `logit_scale` is 0-d in OpenCLIP and `[1]` in clipa.
//!
//! Every transform is a pure data movement, so import then export gives back
//! the same tensors bit for bit.

mod config;
mod hub;
mod keys;

pub use config::{OpenClipConfig, config_json, parse_config};
pub use hub::{
    HUB_CONFIG, HUB_WEIGHTS, Imported, VOCAB_FILES, import_dir, import_files, is_hub_dir,
    read_config,
};
pub use keys::{clipa_shapes, export_state, import_state};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ClipConfig;
    use crate::model::{EvalResize, PosEmbed, TextPool, VisionPool};
    use crate::nn::Activation;
    use crate::numeric::normal_data;
    use crate::state::StateDict;
    use burn::tensor::TensorData;

    const CLIPA_STYLE: &str = r#"{"embed_dim": 64,
      "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4,
        "no_ln_pre": true, "pool_type": "avg", "final_ln_after_pool": true,
        "pos_embed_type": "sin_cos_2d", "act_kwargs": {"approximate": "tanh"}},
      "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
        "no_causal_mask": true, "pool_type": "last", "act_kwargs": {"approximate": "tanh"}}}"#;

    #[test]
    fn parses_the_clipa_style_fixture_config() {
        let cfg = parse_config(CLIPA_STYLE).unwrap().clip;
        assert_eq!(cfg.vision.heads, 2);
        assert_eq!(cfg.vision.mlp_width, 256);
        assert!(!cfg.vision.ln_pre);
        assert_eq!(cfg.vision.pool, VisionPool::AvgPatches);
        assert_eq!(cfg.vision.pos_embed, PosEmbed::SinCos2d);
        assert_eq!(cfg.vision.activation, Activation::GeluTanh);
        assert!(!cfg.text.causal);
        assert_eq!(cfg.text.pool, TextPool::Last);
        // what we write parses back to the same model
        let json = config_json(&cfg, false).unwrap().to_string();
        assert_eq!(parse_config(&json).unwrap().clip, cfg);
        let mut v1 = cfg.clone();
        v1.vision.pool = VisionPool::AvgAll;
        let err = config_json(&v1, false).unwrap_err().to_string();
        assert!(err.contains("avg_all"), "{err}");
    }

    #[test]
    fn odd_mlp_widths_and_legacy_pooling_round_trip() {
        let mut cfg = ClipConfig::tiny();
        cfg.vision.width = 88;
        cfg.vision.heads = 2;
        cfg.vision.mlp_width = 120; // 120/88 is not exact in binary
        let json = config_json(&cfg, false).unwrap().to_string();
        assert_eq!(parse_config(&json).unwrap().clip.vision.mlp_width, 120);
        let legacy = CLIPA_STYLE.replace(
            "\"pool_type\": \"avg\", \"final_ln_after_pool\": true,",
            "\"global_average_pool\": true,",
        );
        let v = parse_config(&legacy).unwrap().clip.vision;
        assert_eq!(v.pool, VisionPool::AvgAll);
        assert!(v.final_ln_after_pool);
        let squash = CLIPA_STYLE.replace(
            "\"no_ln_pre\": true",
            "\"no_ln_pre\": true, \"resize_mode\": \"squash\", \"interpolation\": \"bilinear\"",
        );
        let clip = parse_config(&squash).unwrap().clip;
        assert_eq!(clip.eval_resize, EvalResize::Squash);
        let back = config_json(&clip, false).unwrap();
        assert_eq!(back["vision_cfg"]["resize_mode"], "squash");
        assert_eq!(parse_config(&back.to_string()).unwrap().clip, clip);
        let shortest = squash
            .replace("squash", "shortest")
            .replace("bilinear", "bicubic");
        assert_eq!(
            parse_config(&shortest).unwrap().clip.eval_resize,
            EvalResize::CenterCrop
        );
        let err = parse_config(&squash.replace("squash", "longest"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vision_cfg.resize_mode"), "{err}");
        // A squash with OpenCLIP's default bicubic filter is not clipa's.
        let err = parse_config(&squash.replace("bilinear", "bicubic"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("vision_cfg.interpolation"), "{err}");

        // A hub `open_clip_config.json`: preprocess_cfg is the model's own.
        let hub = format!(
            r#"{{"model_cfg": {CLIPA_STYLE}, "preprocess_cfg": {{"mean": [0.5, 0.5, 0.5],
               "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}}}}"#
        );
        let clip = parse_config(&hub).unwrap().clip;
        assert_eq!(clip.eval_resize, EvalResize::Squash);
        assert_eq!(clip.normalization.mean, [0.5; 3]);
        assert_eq!(clip.normalization.std, [0.25; 3]);
        let err = parse_config(&hub.replace("\"std\"", "\"sd\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("preprocess_cfg.sd"), "{err}");
    }

    /// clipa_torch's `ViT-L-16-CL8-Syntax-GAP.json` (UCSC-VLAA/CLIPA,
    /// `clipa_torch/open_clip/model_configs/`), as published.
    const CLIPA_TORCH_L16_CL8: &str = r#"{"embed_dim": 768,
      "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 16,
        "global_average_pool": true},
      "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 768, "heads": 12,
        "layers": 12, "text_mask": "syntax"}}"#;

    #[test]
    fn clipa_torch_v1_configs_parse_with_their_text_mask() {
        let parsed = parse_config(CLIPA_TORCH_L16_CL8).unwrap();
        assert_eq!(parsed.text_mask, Some(crate::reduce::TextReduction::Syntax));
        let cfg = parsed.clip;
        assert_eq!(cfg.vision.pool, VisionPool::AvgAll);
        assert!(cfg.vision.ln_pre && cfg.text.causal);
        assert_eq!(cfg.text.tokenizer, crate::model::TokenizerConfig::ClipBpe);
        assert_eq!((cfg.text.context_length, cfg.vision.heads), (8, 16));
        // The same architecture as clipa's CLIPA-v1 L/16 preset, at 8 tokens
        // and with OpenCLIP's learned image positions.
        let mut preset = ClipConfig::clipa_v1_l16();
        preset.text.context_length = 8;
        preset.vision.pos_embed = PosEmbed::Learnable;
        preset.normalization = cfg.normalization;
        preset.eval_resize = cfg.eval_resize;
        assert_eq!(cfg, preset);
        // clipa_torch's own spellings of OpenCLIP keys.
        let torch_keys = CLIPA_TORCH_L16_CL8
            .replace(
                "\"global_average_pool\": true",
                "\"global_average_pool\": true, \"pos_embed\": \"sin_cos_2d\", \"gelu_approximate\": \"tanh\", \"ln_pre\": false",
            )
            .replace("\"text_mask\": \"syntax\"", "\"text_mask\": \"first\", \"attention_mask\": false");
        let parsed = parse_config(&torch_keys).unwrap();
        assert_eq!(parsed.text_mask, None);
        assert_eq!(parsed.clip.vision.pos_embed, PosEmbed::SinCos2d);
        assert_eq!(parsed.clip.vision.activation, Activation::GeluTanh);
        assert!(!parsed.clip.vision.ln_pre && !parsed.clip.text.causal);
        let bad = CLIPA_TORCH_L16_CL8.replace("\"syntax\"", "\"noun\"");
        let err = parse_config(&bad).unwrap_err().to_string();
        assert!(err.contains("text_cfg.text_mask"), "{err}");
    }

    #[test]
    fn hf_tokenizer_configs_become_wordpiece_and_back() {
        let hub = CLIPA_STYLE.replace(
            "\"pool_type\": \"last\",",
            "\"pool_type\": \"last\", \"hf_tokenizer_name\": \"bert-base-uncased\", \"tokenizer_kwargs\": {\"strip_sep_token\": true},",
        ).replace("49408", "32000");
        let parsed = parse_config(&hub).unwrap();
        assert_eq!(parsed.hf_tokenizer.as_deref(), Some("bert-base-uncased"));
        assert_eq!(
            parsed.clip.text.tokenizer,
            crate::model::TokenizerConfig::BERT_UNCASED
        );
        let json = config_json(&parsed.clip, false).unwrap();
        assert_eq!(json["text_cfg"]["hf_tokenizer_name"], "bert-base-uncased");
        assert_eq!(parse_config(&json.to_string()).unwrap().clip, parsed.clip);
        let err =
            parse_config(&hub.replace("\"strip_sep_token\": true", "\"clean\": \"canonicalize\""))
                .unwrap_err()
                .to_string();
        assert!(err.contains("tokenizer_kwargs.clean"), "{err}");
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let bad = CLIPA_STYLE.replace("\"no_ln_pre\": true", "\"no_ln_pre\": true, \"rope\": true");
        let err = parse_config(&bad).unwrap_err().to_string();
        assert!(err.contains("unsupported key(s) vision_cfg.rope"), "{err}");
        let bad = CLIPA_STYLE.replace("\"pool_type\": \"last\"", "\"pool_type\": \"mean\"");
        let err = parse_config(&bad).unwrap_err().to_string();
        assert!(
            err.contains("unsupported value \"mean\" for 'text_cfg.pool_type'"),
            "{err}"
        );
        let bad = CLIPA_STYLE.replace(
            "\"embed_dim\": 64,",
            "\"embed_dim\": 64, \"init_logit_bias\": -10,",
        );
        // SigLIP models carry their bias init.
        assert_eq!(
            parse_config(&bad).unwrap().clip.init_logit_bias,
            Some(-10.0)
        );
    }

    #[test]
    fn export_inverts_import_bit_for_bit() {
        let cfg = ClipConfig::tiny();
        let clipa = random_state(&cfg);
        for custom_text in [false, true] {
            let oc = export_state(&clipa, &cfg, custom_text);
            assert_eq!(oc["logit_scale"].shape.as_slice(), &[] as &[usize]);
            assert_eq!(
                oc["visual.transformer.resblocks.1.attn.in_proj_weight"]
                    .shape
                    .as_slice(),
                &[192, 64]
            );
            let back = import_state(&oc, &cfg, custom_text).unwrap();
            assert_eq!(back, clipa);
        }
    }

    /// Every clipa parameter of `cfg`, filled with seeded noise.
    fn random_state(cfg: &ClipConfig) -> StateDict {
        clipa_shapes(cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (k, s))| (k, normal_data(s, i as u64, 1.0)))
            .collect()
    }

    #[test]
    fn in_proj_rows_are_q_then_k_then_v() {
        let cfg = ClipConfig::tiny();
        let mut oc = export_state(&random_state(&cfg), &cfg, false);
        // in_proj_weight[64 + 3][5] is Wk[3][5] (out 3, in 5) = clipa key.weight[5][3].
        let key = "visual.transformer.resblocks.0.attn.in_proj_weight";
        let mut values = oc[key].to_vec::<f32>().unwrap();
        values[(64 + 3) * 64 + 5] = 42.0;
        oc.insert(key.to_string(), TensorData::new(values, [192, 64]));
        let clipa = import_state(&oc, &cfg, false).unwrap();
        let k = clipa["visual.blocks.0.attn.key.weight"]
            .to_vec::<f32>()
            .unwrap();
        assert_eq!(k[5 * 64 + 3], 42.0);
    }

    #[test]
    fn import_names_bad_tensors() {
        let cfg = ClipConfig::tiny();
        let mut oc = export_state(&random_state(&cfg), &cfg, false);
        oc.remove("ln_final.bias");
        oc.insert(
            "visual.proj".into(),
            TensorData::new(vec![0f32; 64 * 32], [64, 32]),
        );
        oc.insert("visual.extra".into(), TensorData::new(vec![0f32], [1]));
        let err = import_state(&oc, &cfg, false).unwrap_err().to_string();
        assert!(err.contains("missing tensor ln_final.bias"), "{err}");
        assert!(
            err.contains("tensor visual.proj has shape [64, 32], the config expects [64, 64]"),
            "{err}"
        );
        assert!(err.contains("unexpected tensor(s) visual.extra"), "{err}");
    }
}
