//! `clipa search`: the checkpoint embeds one query, a text or an image, as
//! `clipa embed` does, and core's exact top-k search
//! ([`clipa_core::search`]) ranks the rows of an `embed` output file by
//! cosine with it.

use std::path::{Path, PathBuf};

use anyhow::ensure;
use clipa_backends::BackendKind;
use clipa_core::checkpoint;
use clipa_core::search::EmbedFile;

use crate::args::SearchArgs;
use crate::commands::embed::Embed;

/// What to search by.
enum Query<'a> {
    Text(&'a str),
    Image(&'a Path),
}

impl SearchArgs {
    fn query(&self) -> Query<'_> {
        match (&self.text, &self.image) {
            (Some(text), _) => Query::Text(text),
            (None, Some(image)) => Query::Image(image),
            (None, None) => unreachable!("clap requires --text or --image"),
        }
    }
}

/// Embeds the query with the checkpoint on the chosen backend: a unit
/// vector, as the index's rows are.
fn embed_query(
    kind: BackendKind,
    device: Option<usize>,
    checkpoint: &Path,
    query: &Query<'_>,
) -> anyhow::Result<Vec<f32>> {
    let (images, captions): (Vec<PathBuf>, Vec<String>) = match query {
        Query::Text(text) => (Vec::new(), vec![text.to_string()]),
        Query::Image(path) => (vec![path.to_path_buf()], Vec::new()),
    };
    let job = Embed {
        checkpoint,
        images: &images,
        captions: &captions,
        batch_size: 1,
    };
    let ((image, _), (text, _)) = clipa_backends::run(kind, device, job)?;
    Ok(match query {
        Query::Text(_) => text,
        Query::Image(_) => image,
    })
}

/// Searches the index and prints the table or the JSON object.
pub fn run(kind: BackendKind, device: Option<usize>, args: &SearchArgs) -> anyhow::Result<()> {
    ensure!(args.top > 0, "--top must be positive");
    // The index's header and the checkpoint's config first: a wrong path,
    // a missing matrix or another checkpoint's width is reported before
    // the model loads.
    let index = EmbedFile::open(&args.index)?;
    let width = checkpoint::load_config(&args.checkpoint)?.embed_dim;
    index.shape_for(args.against, width)?;
    let names = index.names(args.against)?;
    let query = args.query();
    let vector = embed_query(kind, device, &args.checkpoint, &query)?;
    let hits = index.search(args.against, &vector, args.top)?;
    let name = |i: usize| names.get(i).map(String::as_str);
    if args.json {
        let query = match query {
            Query::Text(text) => serde_json::json!({ "text": text }),
            Query::Image(path) => serde_json::json!({ "image": path.display().to_string() }),
        };
        let results: Vec<_> = hits
            .iter()
            .enumerate()
            .map(|(rank, hit)| {
                serde_json::json!({
                    "rank": rank + 1,
                    "index": hit.index,
                    "score": hit.score,
                    "name": name(hit.index),
                })
            })
            .collect();
        let report = serde_json::json!({
            "query": query,
            "against": args.against,
            "top": args.top,
            "results": results,
        });
        outln!("{report}");
        return Ok(());
    }
    let width = hits
        .iter()
        .map(|h| h.index.to_string().len())
        .max()
        .unwrap_or(0)
        .max(5);
    outln!("rank    score  {:>width$}  name", "index");
    for (rank, hit) in hits.iter().enumerate() {
        outln!(
            "{:>4}  {:>7.4}  {:>width$}  {}",
            rank + 1,
            hit.score,
            hit.index,
            name(hit.index).unwrap_or("-")
        );
    }
    Ok(())
}
