//! `clipa data`: dataset converters.

use clipa_core::data::fmnist::{FashionMnistOptions, convert};

use crate::args::DataCommand;

/// Runs a data subcommand.
pub fn run(cmd: &DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::FashionMnist(a) => {
            let summary = convert(&FashionMnistOptions {
                input: a.input.clone(),
                out: a.out.clone(),
                samples_per_shard: a.samples_per_shard,
                seed: a.seed,
                limit_train: a.limit_train,
                limit_test: a.limit_test,
            })?;
            outln!(
                "wrote {} training samples in {} shards and {} test images (also in clip_benchmark's layout: {})\n\ntrain with:\n  clipa train --preset fmnist --train-data '{}' --zeroshot-data {} --classnames {}",
                summary.train_samples,
                summary.train_shards,
                summary.test_samples,
                summary.test_wds.display(),
                summary.train_pattern,
                summary.test_dir.display(),
                summary.classnames.display()
            );
            Ok(())
        }
    }
}
